import torch

from expertrag.moe import MoEAux, MoEConfig, MoELayer, collapse_flags, layer_stats


def _aux(counts, e_total=None, retrieval=False):
    n = 10
    return MoEAux(
        router_logits=torch.zeros(n, e_total or len(counts)),
        aux_loss=torch.tensor(0.0),
        z_loss=torch.tensor(0.0),
        tokens_per_expert=torch.tensor(counts),
        retrieval_affinity=torch.zeros(2, 5) if retrieval else None,
    )


def test_stats_and_no_flags_when_balanced():
    s = layer_stats(_aux([5, 5, 5, 5]), layer=3)
    assert s.token_share == [0.25] * 4 and s.layer == 3
    assert abs(s.router_entropy - torch.log(torch.tensor(4.0)).item()) < 1e-5
    assert s.retrieval_rate is None
    assert collapse_flags(s) == []


def test_collapse_flags():
    starved = layer_stats(_aux([10, 9, 1, 0]), layer=1)  # 1/20 and 0 < 1/16
    flags = collapse_flags(starved)
    assert [(f.layer, f.expert, f.kind) for f in flags] == [(1, 2, "starved"), (1, 3, "starved")]
    assert "layer 1 expert 2 starved" in flags[0].message()
    dominant = layer_stats(_aux([7, 1, 1, 1]), layer=0)
    assert [(f.expert, f.kind) for f in collapse_flags(dominant)] == [(0, "dominant")]
    assert len(collapse_flags([starved, dominant])) == 3


def test_retrieval_slot_kept_out_of_token_share():
    s = layer_stats(_aux([4, 4, 4, 4, 3], e_total=5, retrieval=True))
    assert s.token_share == [0.25] * 4 and len(s.mean_prob) == 5
    assert abs(s.retrieval_rate - 0.3) < 1e-6


def test_stats_from_a_real_layer():
    torch.manual_seed(0)
    _, aux = MoELayer(MoEConfig(router_init_std=0.5), 16, 8)(torch.randn(2, 8, 16))
    s = layer_stats(aux)
    assert abs(sum(s.token_share) - 1) < 1e-6 and abs(sum(s.mean_prob) - 1) < 1e-5
    assert 0 < s.router_entropy <= torch.log(torch.tensor(4.0)).item() + 1e-6
