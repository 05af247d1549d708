import pytest

from helpers import write_adapter, write_checkpoint

# name -> (rank, target modules); ranks 1..16, different module sets
ADAPTERS = {
    "r1_qv": (1, ["q_proj", "v_proj"]),
    "r4_attn": (4, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r8_mlp": (8, ["gate_proj", "up_proj", "down_proj"]),
    "r16_all": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "r5_mixed": (5, ["k_proj", "o_proj", "up_proj"]),
}


@pytest.fixture(scope="session", params=["llama", "llama_gqa", "qwen2", "mistral", "llama3"])
def model_set(request, tmp_path_factory):
    """(base path, {adapter name: path}) for one architecture."""
    root = tmp_path_factory.mktemp(request.param)
    base = write_checkpoint(str(root / "base"), request.param)
    adapters = {name: write_adapter(str(root / name), base, rank, modules, seed=i + 1,
                                    use_rslora=(name == "r5_mixed"))
                for i, (name, (rank, modules)) in enumerate(ADAPTERS.items())}
    return base, adapters
