"""The `serve:` config section: where the service listens and the limits it enforces."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RayAutoscaling(BaseModel):
    """Ray Serve autoscaling of the pipeline deployment: replicas follow the requests in flight."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0, description="replicas kept when idle (0: the first request waits for one)")
    max_replicas: int = Field(2, ge=1, description="most replicas (each loads the model)")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="requests in flight per replica that autoscaling aims at")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class RayExpertScaling(BaseModel):
    """One domain expert's own Ray Serve deployment (`serve.ray.experts.NAME`, or `serve.ray.expert_default`)."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=0, description="replicas of this expert's deployment (each loads the model and "
                                                "the index); 0: no deployment of its own, the pipeline answers")
    autoscaling: RayAutoscaling | None = Field(
        None, description="scale this expert's replicas between min and max instead of a fixed count")
    cpus_per_replica: float | None = Field(None, gt=0, description="Ray CPUs per replica (null: serve.ray's)")
    max_ongoing_requests: int | None = Field(None, gt=0, description="null: serve.ray.max_ongoing_requests")

    @model_validator(mode="after")
    def _one_scaling(self):
        if self.autoscaling is not None and "replicas" in self.model_fields_set:
            raise ValueError("give replicas or autoscaling, not both")
        return self

    @property
    def deployed(self) -> bool:
        """Does this expert get a deployment of its own?"""
        return self.autoscaling is not None or self.replicas > 0


class RayServeConfig(BaseModel):
    """`expertrag serve --ray`: the API on a Ray Serve ingress, the pipeline in its own deployment."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=1, description="pipeline replicas (each loads the model once); fixed count")
    autoscaling: RayAutoscaling | None = Field(
        None, description="scale the pipeline replicas between min and max instead of a fixed count")
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs reserved by each pipeline replica")
    threads_per_replica: int = Field(1, gt=0, description="torch intra-op threads of each pipeline replica")
    max_ongoing_requests: int = Field(
        16, gt=0, description="requests one pipeline replica takes at once (its own queue batches them)")
    expert_default: RayExpertScaling = Field(
        default_factory=RayExpertScaling, description="the deployment of every domain expert not named in "
                                                      "serve.ray.experts ({replicas: 0}: none, the pipeline answers)")
    experts: dict[str, RayExpertScaling] = Field(
        default_factory=dict, description="per domain expert (by registry name): its deployment's replicas or "
                                          "autoscaling bounds, overriding expert_default")
    expert_poll_s: float = Field(2.0, gt=0, description="how often experts added or retired at run time are "
                                                        "looked for (deployments created / removed)")

    @model_validator(mode="after")
    def _one_scaling(self):
        if self.autoscaling is not None and "replicas" in self.model_fields_set:
            raise ValueError("give serve.ray.replicas or serve.ray.autoscaling, not both")
        from expertrag.experts.registry import GENERAL, NAME_RE

        for name in self.experts:
            if name == GENERAL:
                raise ValueError(f"experts.{name}: the general expert is the pipeline deployment; scale it with "
                                 "serve.ray.replicas or serve.ray.autoscaling")
            if not NAME_RE.match(name):
                raise ValueError(f"experts.{name!r}: not an expert name (1-64 letters, digits, '_', '-' or '.', "
                                 "starting with a letter or digit)")
        return self

    def expert(self, name: str) -> RayExpertScaling:
        """The scaling of expert `name`'s deployment: its own entry, else the default."""
        return self.experts.get(name, self.expert_default)


class ServeConfig(BaseModel):
    """`expertrag serve`. Command-line options override host and port."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="bind address (loopback by default: expose it deliberately)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    keys_file: str | None = Field(None, description="API keys file (null = INDEX/keys.json)")
    max_body_bytes: int = Field(2_000_000, gt=0, description="largest request body accepted (413 above)")
    max_tokens_cap: int = Field(256, gt=0, description="largest max_tokens a request may ask for")
    max_k: int = Field(20, gt=0, description="largest k a request may ask for")
    max_documents: int = Field(1000, gt=0, description="documents per POST /v1/documents")
    rate_limit_per_minute: float = Field(
        600.0, ge=0, description="requests per minute per API key (token bucket; 0 = no limit)")
    rate_limit_burst: int = Field(30, gt=0, description="requests a key may send at once before the rate applies")
    queue_size: int = Field(64, gt=0, description="answers waiting for the model; a full queue answers 503 at once")
    batch_max: int = Field(8, gt=0, description="most answers generated together in one batch")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long the worker waits for a batch to fill")
    request_timeout_s: float = Field(120.0, gt=0, description="an answer not done by then gets 504")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    torch_threads: int | None = Field(
        None, gt=0, description="intra-op threads of the model (null = torch's default; on a small shared "
                                "machine 1 is often faster than 2)")
    recent_latencies: int = Field(1000, gt=0, description="answers kept for the page's p50/p95 latency")
    ray: RayServeConfig = Field(default_factory=RayServeConfig, description="`serve --ray` deployments")
