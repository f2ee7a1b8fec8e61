import pytest
from pydantic import ValidationError

from expertrag.config import ExpertRAGConfig
from expertrag.moe.config import MoEConfig, moe_layer_indices


def test_layer_specs():
    assert moe_layer_indices("all", 4) == [0, 1, 2, 3]
    assert moe_layer_indices("every:2", 7) == [1, 3, 5]
    assert moe_layer_indices("every:1", 3) == [0, 1, 2]
    assert moe_layer_indices("5, 0,2", 6) == [0, 2, 5]


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("every:0", "N >= 1"),
        ("every:9", "exceeds"),
        ("0,7", "out of range"),
        ("1,1", "duplicate"),
        ("", "not understood"),
        ("-1", "not understood"),
        ("half", "not understood"),
        ("0,,2", "not understood"),
    ],
)
def test_bad_layer_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        moe_layer_indices(spec, 6)


def test_config_validation():
    cfg = MoEConfig(num_experts=4, top_k=2, retrieval_expert=True)
    assert cfg.num_slots == 5
    with pytest.raises(ValidationError):
        MoEConfig(top_k=5, num_experts=4)
    with pytest.raises(ValidationError):
        MoEConfig(layers="sometimes")
    with pytest.raises(ValidationError):
        MoEConfig(retrieval_rank=10, retrieval_heads=4)
    with pytest.raises(ValidationError):
        MoEConfig(unknown_knob=1)
    # every knob is documented
    assert all(f.description for f in MoEConfig.model_fields.values())
    # composes into the top-level config
    assert ExpertRAGConfig.model_validate({"moe": {"expert_kind": "lora"}}).moe.expert_kind == "lora"
