"""Slicing for tensor parallelism, without processes: each rank's shard of an adapter, run as the
sharded model runs it (default mode: partial sums of row layers added up; fully sharded: the
shrink outputs gathered rank-interleaved, row outputs in slices), gives the full adapter's
update; each rank's weights give the full layer; sizes that do not divide are refused by name."""
import pytest
import torch

from engine.adapters import LoRAAdapter, pack_adapter
from engine.config import EngineConfig, ModelConfig
from engine.parallel import ShardLayout
from engine.sharding import COLUMN_MODULES, _in_cols, _out_rows, shard_adapter, shard_weights
from engine.checkpoint import random_weights

CONFIG = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 32,
                                "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2})
PAGE = 37  # odd, so pieces straddle pages


def full_adapter(rank: int) -> tuple[dict, object]:
    gen = torch.Generator().manual_seed(rank)
    shapes = CONFIG.projection_shapes()
    weights = [{m: (torch.randn(rank, shapes[m][0], generator=gen), torch.randn(shapes[m][1], rank, generator=gen),
                    1.0) for m in shapes} for _ in range(CONFIG.num_layers)]
    return weights, pack_adapter(LoRAAdapter("a", "<memory>", rank, tuple(shapes), weights), CONFIG, PAGE,
                                 torch.float32)


def piece(data: torch.Tensor, offset: int, rows: int, cols: int, layer: int) -> torch.Tensor:
    return data[layer, offset:offset + rows * cols].view(rows, cols)


@pytest.mark.parametrize("size,fully_sharded", [(2, False), (4, False), (2, True), (4, True)])
@pytest.mark.parametrize("rank", [5, 8])
def test_adapter_shards_give_the_full_update(size, fully_sharded, rank):
    weights, full = full_adapter(rank)
    packed = shard_adapter(full, CONFIG, size, fully_sharded, PAGE)
    assert packed.data.shape[:2] == (size, CONFIG.num_layers) and packed.data.shape[2] == packed.num_pages * PAGE
    layouts = [ShardLayout.of(CONFIG, j, size, fully_sharded) for j in range(size)]
    local = layouts[0].local_config(CONFIG).projection_shapes()
    x_all = torch.randn(3, 48)
    for layer in range(CONFIG.num_layers):
        for m, (a, b, _) in weights[layer].items():
            n_in, n_out = local[m]
            r = packed.ranks[m]
            expected = x_all[:, :a.shape[1]] @ (b @ a).t()  # [3, out] of the full module
            if m in COLUMN_MODULES:
                a_rows = r // size if fully_sharded else r
                zs = [x_all[:, :a.shape[1]] @ piece(packed.data[j], packed.a_offsets[m], a_rows, n_in, layer).t()
                      for j in range(size)]
                # fully sharded: rank j holds rows j, j+N, ...: interleave (what all_gather_ranks does)
                z = torch.stack(zs, dim=2).reshape(3, a_rows * size) if fully_sharded else zs[0]
                for j, s in enumerate(layouts):
                    y = z @ piece(packed.data[j], packed.b_offsets[m], r, n_out, layer)
                    torch.testing.assert_close(y, expected[:, _out_rows(m, CONFIG, s)], rtol=1e-4, atol=1e-4)
            else:
                z = sum(x_all[:, _in_cols(m, CONFIG, s)] @ piece(packed.data[j], packed.a_offsets[m], r, n_in,
                                                                 layer).t() for j, s in enumerate(layouts))
                width = CONFIG.hidden_size // size if fully_sharded else CONFIG.hidden_size
                ys = [z @ piece(packed.data[j], packed.b_offsets[m], r, width, layer) for j in range(size)]
                torch.testing.assert_close(torch.cat(ys, 1) if fully_sharded else ys[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [2, 4])
def test_weight_shards_give_the_full_layers(size):
    full = random_weights(CONFIG, torch.float32, torch.device("cpu"))
    shards = [shard_weights(CONFIG, ShardLayout.of(CONFIG, j, size), full) for j in range(size)]
    x = torch.randn(3, CONFIG.hidden_size)
    # column layers: the concatenation of the ranks' rows; row layers: the sum of partial products
    q = CONFIG.num_heads * CONFIG.head_dim
    q_rows = torch.cat([s["0.qkv"][:q // size] for s in shards])
    torch.testing.assert_close(q_rows, full["0.qkv"][:q])
    act = torch.randn(3, CONFIG.intermediate_size)
    down = sum(act[:, j * (48 // size):(j + 1) * (48 // size)] @ s["0.down"].t() for j, s in enumerate(shards))
    torch.testing.assert_close(down, act @ full["0.down"].t(), rtol=1e-5, atol=1e-5)
    vocab = torch.cat([s["embed"] for s in shards])
    torch.testing.assert_close(vocab[:CONFIG.vocab_size], full["embed"])
    assert not vocab[CONFIG.vocab_size:].any()  # padding rows


@pytest.mark.parametrize("overrides,size,words", [
    ({"num_attention_heads": 6, "num_key_value_heads": 6, "hidden_size": 48}, 4, "6 attention heads"),
    ({"num_key_value_heads": 6, "num_attention_heads": 12, "hidden_size": 48}, 4, "6 KV heads"),
    ({"intermediate_size": 50}, 4, "intermediate_size 50"),
    ({"num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 36, "head_dim": 8}, 8,
     "hidden_size 36"),
])
def test_sizes_that_do_not_divide_are_refused(overrides, size, words):
    config = ModelConfig.from_dict({**{"architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 32,
                                       "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
                                       "num_key_value_heads": 2}, **overrides})
    with pytest.raises(ValueError, match=words):
        ShardLayout.of(config, 0, size, fully_sharded_loras=True)


def test_kv_heads_are_replicated_when_fewer_than_ranks():
    starts = [ShardLayout.of(CONFIG, j, 4).kv_head_start for j in range(4)]
    assert starts == [0, 0, 1, 1] and ShardLayout.of(CONFIG, 0, 4).num_kv_heads == 1


@pytest.mark.parametrize("value", [0, -1, "two", True, 1.5])
def test_tensor_parallel_size_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(model="m", tensor_parallel_size=value)
