"""bench/kernels.py's LoRA setup on a tiny case (interpreter on CPU): the split pair and the fused
kernel both match its torch reference, so the GPU run's "rel err" column starts from a checked
setup and the script at least imports and builds its inputs here."""
import pytest
import torch

bench_kernels = pytest.importorskip("bench.kernels")


@pytest.mark.parametrize("segment,r_max", [(0, 0), (4, 0), (0, 16)], ids=["decode", "prefill", "decode_rank_bound"])
def test_bench_lora_setup_matches_its_reference(monkeypatch, segment, r_max):
    """r_max: z's rank bound above the adapters' rank, as the decode graphs run the kernels."""
    monkeypatch.setattr(bench_kernels, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(bench_kernels, "DTYPE", torch.float32)
    case = bench_kernels.LoraCase("tiny", 9, 3, 4, 64, (32, 16), segment=segment, r_max=r_max)
    setup = bench_kernels.LoraSetup(case)
    assert setup.max_error() < 1e-4
    assert setup.max_error(fused=True) < 1e-4
    assert setup.bytes_moved(fused=True) < setup.bytes_moved()
