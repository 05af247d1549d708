"""No request reads what another wrote: pool memory that belongs to no live request (freed KV
pages, the decode graphs' scratch page, the slack of adapter pages) holds NaN, +inf and -inf
before every step, and requests still give the tokens and log probabilities of a clean engine:
the demo model on the reference ops, a one-layer model on the Triton kernels (the interpreter
on CPU), each with decode graphs off and static (their padding rows).

Such values are what a request whose activations overflowed (an adapter with lora_alpha = inf,
an fp16 overflow) leaves in the pages it frees. Attention reads K/V through block tables padded
past each sequence's length; a softmax weight of 0 times a stale NaN is NaN, so every loaded
row past the length has to be masked, not only its score.
"""
import os

import pytest
import torch

from demo.tasks import TASKS
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from helpers import write_adapter, write_checkpoint

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "demo")
DEMO = os.path.join(ROOT, "base")
DEMO_ADAPTERS = {name: os.path.join(ROOT, "adapters", name) for name in ("upper", "reverse", "rot13")}
# lengths chosen so that last pages are partly filled (block size 8) and sequences end at
# different steps, freeing pages (KV and evicted adapters') for later ones
DEMO_JOBS = [("ab3", "upper"), ("hello w", None), ("xyz", "reverse"), ("mno pq", "upper"), ("q1", "rot13"),
             ("k", "reverse")]
POISON = (float("nan"), float("inf"), float("-inf"))


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """NaN, +inf, -inf in turn along the last dim: NaN and infinities in K and in V."""
    pattern = torch.tensor(POISON, dtype=t.dtype, device=t.device)
    return pattern.repeat(-(-t.shape[-1] // 3))[:t.shape[-1]].expand_as(t)


def poison_unowned(runner, pages, adapters) -> int:
    """Fill every pool element no live request owns; returns the number of pages filled whole."""
    pool = runner.pool  # [P + 1, L, PAGE]; page P is the decode graphs' scratch page
    free = pages.free_pages()
    whole = free + [runner.num_pages]
    index = torch.tensor(whole, dtype=torch.int64, device=pool.device)
    pool[index] = poison_like(pool[index])
    # a resident adapter's last page past its packed elements
    page_size = runner.page_size
    for name, packed in adapters.items():  # the step's adapters, all resident
        used = max(packed.b_offsets[m] + r * runner.out_sizes[m] for m, r in packed.ranks.items() if r)
        owned = pages.adapter_pages(name)
        last, start = used // page_size, used % page_size
        if start:
            pool[owned[last], :, start:] = poison_like(pool[owned[last], :, start:])
        for p in owned[last + 1 if start else last:]:
            pool[p] = poison_like(pool[p])
    return len(whole)


def check_padding_rows(runner, step, n: int, b: int) -> None:
    """Rows n..b of a decode graph step read and write the scratch page only, which no real row names."""
    scratch, host = runner.graphs.scratch_page, runner.graphs.arena.host
    assert (host["block_tables"][n:b] == scratch).all()
    assert (host["slot_mapping"][n:b] == scratch * runner.block_size).all()
    assert (host["seq_lens"][n:b] == 1).all() and (host["feed_rows"][n:b] == -1).all()
    assert not step.adapter_pages or (host["token_slots"][n:b] == -1).all()
    assert all(scratch not in table for table in step.block_tables)


def generate(model: str, adapters: dict[str, str], jobs: list, poisoned: bool, dtype: str = "float32",
             device: str = "cpu", **engine_args):
    """The jobs' outputs; with ``poisoned``, unowned pool memory is poisoned before every step
    (on the device's stream, so in order with the steps)."""
    llm = LLM(model=model, adapters=adapters, dtype=dtype, device=device, **engine_args)
    runner = llm.engine.runner
    run, filled = runner.run, []

    def poisoned_run(plan, pages, adapters, eos_token_ids):
        filled.append(poison_unowned(runner, pages, adapters))
        return run(plan, pages, adapters, eos_token_ids)

    if poisoned:
        runner.run = poisoned_run
    padded = []  # decode steps run in a larger bucket: the graphs' padding rows are used
    if runner.graphs is not None:
        graphs_run = runner.graphs.run

        def counting_run(step):
            n, b = len(step.input_ids), runner.graphs.bucket(len(step.input_ids))
            padded.append(b > n)
            logits = graphs_run(step)
            check_padding_rows(runner, step, n, b)
            return logits

        runner.graphs.run = counting_run
    params = [SamplingParams(temperature=0, max_tokens=n, logprobs=1, ignore_eos=True) for _, _, n in jobs]
    outs = llm.generate([p for p, _, _ in jobs], params, lora_names=[name for _, name, _ in jobs])
    llm.engine.pages.check_invariants()
    if poisoned:
        assert filled and max(filled) > 1, "nothing was poisoned"  # a full pool leaves the scratch page only
    assert any(padded) == (runner.graphs is not None), "no padding row in the decode graphs' steps"
    return outs


def assert_same_outputs(got, clean) -> None:
    assert [o.token_ids for o in got] == [o.token_ids for o in clean]
    # bit for bit: masked loads make the stale values' weight an exact 0 in both runs
    for g, c in zip(got, clean):
        assert all(abs(v) < float("inf") for step in g.logprobs for v in step.values())
        assert g.logprobs == c.logprobs and g.cumulative_logprob == c.cumulative_logprob


# max_num_batched_tokens 16: prompts are prefilled in chunks, beside decode rows. Decode steps of
# 3 sequences run in the graphs' bucket of 4 (one padding row); max_num_seqs 5: a row that held a
# sequence in a step of 5 (bucket 8) is a padding row in a later step of 3
@pytest.mark.parametrize("decode_graphs", ["off", "static"])
def test_demo_reference_ops_read_no_stale_kv(decode_graphs):
    jobs = [(s, name, len(s) + 1) for s, name in DEMO_JOBS]  # the answer and its EOS
    config = dict(kernels="reference", decode_graphs=decode_graphs, block_size=8, num_pages=100, max_lora_rank=16,
                  max_num_seqs=5, max_num_batched_tokens=16)
    clean = generate(DEMO, DEMO_ADAPTERS, jobs, False, **config)
    assert [o.text for o in clean] == [TASKS[name or ""](s) for s, name in DEMO_JOBS]  # a meaningful baseline
    assert_same_outputs(generate(DEMO, DEMO_ADAPTERS, jobs, True, **config), clean)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """One layer, LoRA on the q,k,v group only: few launches a step, for the interpreter."""
    root = tmp_path_factory.mktemp("kv_isolation")
    base = write_checkpoint(str(root / "base"), "llama_gqa", num_hidden_layers=1)
    adapters = {"a": write_adapter(str(root / "a"), base, 4, ["q_proj", "v_proj"], seed=1),
                "b": write_adapter(str(root / "b"), base, 2, ["k_proj", "v_proj"], seed=2)}
    return base, adapters


@pytest.mark.parametrize("decode_graphs", ["off", "static"])
def test_triton_kernels_read_no_stale_kv(tiny_model, decode_graphs):
    base, adapters = tiny_model
    # (prompt, adapter, max_tokens): contexts of 6 to 12 tokens, most ending inside a page of 4
    jobs = [([1, 40, 41, 42], "a", 3), ([1, 50, 51, 52, 53, 54, 55, 56, 57, 58], None, 2), ([1, 60], "b", 4),
            ([1, 70, 71], "a", 2)]
    config = dict(kernels="triton", decode_graphs=decode_graphs, block_size=4, num_pages=24, max_lora_rank=8,
                  max_num_seqs=3, max_num_batched_tokens=8)
    assert_same_outputs(generate(base, adapters, jobs, True, **config), generate(base, adapters, jobs, False, **config))


# -- the GPU tier: every GPU path (Triton decode and prefill attention, CUDA-graph decode with
# padding rows, the LoRA shrink/expand kernels over adapter pages) in fp16 and bf16 -----------------
GPU_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    """Two layers, head_dim 64 (the kernels' real tiles), GQA; adapters of three ranks on every
    module, one on a subset."""
    root = tmp_path_factory.mktemp("kv_isolation_gpu")
    base = write_checkpoint(str(root / "base"), "llama_gqa", hidden_size=512, intermediate_size=1024,
                            num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2)
    # alpha = r / 4 (scale 0.25): at write_adapter's default scale of 2 the rank-33 adapter on every
    # module overflows float16 on the GPU (its requests then fail as non-finite, correctly)
    adapters = {"r16": write_adapter(str(root / "r16"), base, 16, GPU_MODULES, seed=1, alpha=4),
                "r3": write_adapter(str(root / "r3"), base, 3, GPU_MODULES, seed=2, alpha=0.75),
                "r8": write_adapter(str(root / "r8"), base, 8, ["q_proj", "v_proj", "down_proj"], seed=3, alpha=2),
                "r33": write_adapter(str(root / "r33"), base, 33, GPU_MODULES, seed=4, alpha=8.25)}
    return base, adapters


def gpu_jobs() -> list:
    """(prompt ids, adapter, max_tokens): 24 requests, contexts of 2 to 150 tokens that mostly end
    inside a page of 16, each adapter and the base; more than fit at once, so pages and adapter
    pages are freed and given to later requests."""
    gen = torch.Generator().manual_seed(3)
    names = ["r16", None, "r3", "r8", "r33", "r16"]
    jobs = []
    for i in range(24):
        length = int(torch.randint(2, 130, (1,), generator=gen))
        prompt = [1] + torch.randint(3, 290, (length,), generator=gen).tolist()
        jobs.append((prompt, names[i % len(names)], int(torch.randint(3, 21, (1,), generator=gen))))
    return jobs


@pytest.fixture
def no_split_k(monkeypatch):
    """The LoRA shrink without split K: its fp32 atomics sum in no fixed order, and the two runs
    compared must be bitwise the same where no stale value is read."""
    import dataclasses

    from kernels import tiles

    chosen = tiles.shrink_tiles
    monkeypatch.setattr(tiles, "shrink_tiles", lambda *a, **k: dataclasses.replace(chosen(*a, **k), split_k=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("decode_graphs", ["auto", "off"])  # auto on CUDA: captured CUDA graphs
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_paths_read_no_stale_kv(gpu_model, no_split_k, dtype, decode_graphs, async_scheduling):
    base, adapters = gpu_model
    # 128 pages of 16 tokens (r33 takes 64, r16 31): a few requests at a time, adapters evicted and
    # loaded again; prefill in chunks of 64 tokens beside decode rows; decode steps of 1 to 8 rows
    # in buckets 1, 2, 4, 8
    config = dict(kernels="triton", decode_graphs=decode_graphs, async_scheduling=async_scheduling,
                  block_size=16, num_pages=128, max_lora_rank=64, max_num_seqs=8, max_num_batched_tokens=64,
                  dtype=dtype, device="cuda", warmup=False)
    jobs = gpu_jobs()
    clean = generate(base, adapters, jobs, False, **config)
    assert all(o.token_ids and o.error is None for o in clean)
    assert_same_outputs(generate(base, adapters, jobs, True, **config), clean)
