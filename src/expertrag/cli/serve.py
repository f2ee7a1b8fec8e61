"""`expertrag serve` and `expertrag keys add|list|revoke`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from expertrag.cli import eval_common as ec
from expertrag.cli.app import app
from expertrag.config import ExpertRAGConfig

keys_app = typer.Typer(help="API keys of the service (stored hashed beside the index).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@app.command("serve")
def serve_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="index directory (built by `expertrag index`)"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config (its serve: section sets limits)"),
    host: str | None = typer.Option(None, "--host", help="bind address (default serve.host, 127.0.0.1)"),
    port: int | None = typer.Option(None, "--port", help="TCP port (default serve.port, 8000)"),
    backend: str | None = typer.Option(None, "--backend", help=ec.BACKEND_HELP),
    on_ray: bool = typer.Option(False, "--ray", help="the pipeline in Ray Serve replicas behind the same API "
                                                     "(serve.ray: replicas / autoscaling); pip install -e '.[ray]'"),
    address: str | None = typer.Option(None, "--address", help=ec.ADDRESS_HELP),
) -> None:
    """Serve the HTTP API and the web page: answers (streamed or not), OpenAI-compatible chat, search,
    documents, metrics. Every /v1 route needs an API key (`expertrag keys add`)."""
    from expertrag.errors import InputError

    if address is not None and not on_ray:
        raise InputError("--address needs --ray")
    if on_ray:
        from expertrag.serve.ray_serve import require_serve

        require_serve()  # before the config or the index is read: one line naming the extra
    config = ec.with_backend(ExpertRAGConfig.load(config_path), backend)
    if port is not None and not 0 <= port <= 65535:
        raise InputError(f"--port {port}: must be between 0 and 65535")
    if on_ray:
        from expertrag.serve.ray_serve import run_on_ray

        ec.check_index(index)
        run_on_ray(index, config, host or config.serve.host, config.serve.port if port is None else port, address)
        return
    from expertrag.serve.server import run
    from expertrag.serve.service import Service

    service = Service(index, config)
    run(service, host or config.serve.host, config.serve.port if port is None else port)


def _store(index: Path, config_path: Path | None):
    from expertrag.errors import InputError
    from expertrag.serve.keys import KeyStore, keys_path

    if not index.is_dir():
        raise InputError(f"{index}: index directory not found")
    config = ExpertRAGConfig.load(config_path)
    return KeyStore(keys_path(index, config.serve.keys_file))


@keys_app.command("add")
def keys_add(
    index: Path = typer.Option(..., "--index", "-i", help="index directory the keys belong to"),
    name: str = typer.Option(..., "--name", help="who the key is for (letters, digits, _ . -)"),
    groups: str = typer.Option("", "--groups", help="comma-separated access groups, e.g. hr,eng"),
    admin: bool = typer.Option(False, "--admin", help="may ingest, delete and see every passage"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config (serve.keys_file)"),
    as_json: bool = typer.Option(False, "--json", help='last line: {"name", "key", "groups"}'),
) -> None:
    """Create a key and print it once: only its hash is stored."""
    store = _store(index, config_path)
    group_list = [g.strip() for g in groups.split(",") if g.strip()]
    key = store.add(name, group_list, admin=admin)
    if as_json:
        print(json.dumps({"name": name, "key": key, "groups": sorted(set(group_list)), "admin": admin}))
    else:
        print(f"key for {name} (groups: {', '.join(sorted(set(group_list))) or 'none: public passages only'}"
              f"{'; admin' if admin else ''}):\n{key}\nIt is shown only now; the index keeps its hash.")


@keys_app.command("list")
def keys_list(
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config (serve.keys_file)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per key"),
) -> None:
    """Keys by name, groups and state (never the keys themselves)."""
    for k in _store(index, config_path).list():
        if as_json:
            print(json.dumps(k))
        else:
            state = f"revoked {k['revoked_at']}" if k["revoked_at"] else "active"
            print(f"{k['name']:<24} {','.join(k['groups']) or '-':<24} {'admin' if k['admin'] else '':<6} {state}")


@keys_app.command("revoke")
def keys_revoke(
    name: str = typer.Argument(..., help="the key's name"),
    index: Path = typer.Option(..., "--index", "-i", help="index directory"),
    config_path: Path | None = typer.Option(None, "--config", help="YAML config (serve.keys_file)"),
) -> None:
    """Revoke a key; a running server refuses it from its next request on."""
    _store(index, config_path).revoke(name)
    print(f"revoked {name}")
