"""Adapter loading: what is accepted, and clear errors for everything that is not."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.adapters import load_adapter, pack_adapter, read_adapter
from engine.config import ModelConfig
from engine.errors import AdapterLoadError, AdapterNotFoundError, InvalidRequestError
from engine.lora_manager import LoRAManager
from engine.request_checks import check_adapter_name
from helpers import write_adapter, write_checkpoint


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = write_checkpoint(str(root / "base"), "llama")
    adapter = write_adapter(str(root / "good"), base, 8, ["q_proj", "down_proj"], seed=1, alpha=4)
    return base, adapter


def broken_copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        path = os.path.join(dst, "adapter_model.safetensors")
        tensors = load_file(path)
        edit_tensors(tensors)
        save_file(tensors, path)
    if edit_config:
        path = os.path.join(dst, "adapter_config.json")
        with open(path) as f:
            cfg = json.load(f)
        edit_config(cfg)
        with open(path, "w") as f:
            json.dump(cfg, f)
    return str(dst)


def test_good_adapter_scale_and_modules(base_and_adapter):
    base, path = base_and_adapter
    a = load_adapter("good", path, ModelConfig.from_dir(base), max_lora_rank=16)
    assert a.rank == 8 and a.modules == ("q_proj", "down_proj")
    _, _, scale = a.weights[0]["q_proj"]
    assert scale == pytest.approx(4 / 8)


def test_rslora_scale(tmp_path, base_and_adapter):
    base, _ = base_and_adapter
    path = write_adapter(str(tmp_path / "rs"), base, 16, ["v_proj"], seed=2, alpha=8, use_rslora=True)
    a = load_adapter("rs", path, ModelConfig.from_dir(base), max_lora_rank=16)
    assert a.weights[1]["v_proj"][2] == pytest.approx(8 / 4)


def _nan(t):
    key = next(k for k in t if "lora_B" in k)
    t[key][0, 0] = float("nan")


def _bad_shape(t):
    key = next(k for k in t if "lora_A" in k)
    t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1)


def _embed(t):
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 300)


@pytest.mark.parametrize("edit_tensors, edit_config, message", [
    (None, None, "exceeds max_lora_rank=4"),
    (_nan, None, "NaN or Inf"),
    (_bad_shape, None, "do not match the base model"),
    (_embed, None, "not supported"),
    (None, lambda c: c.update(use_dora=True), "DoRA"),
    (None, lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_bad_adapters_are_rejected_clearly(tmp_path, base_and_adapter, edit_tensors, edit_config, message):
    base, good = base_and_adapter
    path = broken_copy(good, tmp_path / "bad", edit_tensors, edit_config)
    max_rank = 4 if message.startswith("exceeds") else 64
    with pytest.raises(AdapterLoadError, match=message):
        read_adapter("bad", path, ModelConfig.from_dir(base), max_lora_rank=max_rank, page_size=512,
                     dtype=torch.float32)


def test_weights_that_overflow_the_serving_dtype_are_rejected(tmp_path, base_and_adapter):
    base, good = base_and_adapter

    def huge(t):
        key = sorted(k for k in t if "lora_B" in k)[-1]
        t[key] = torch.full_like(t[key], 1e6)  # finite in float32, Inf in float16

    path = broken_copy(good, tmp_path / "huge", huge)
    model = ModelConfig.from_dir(base)
    assert read_adapter("huge", path, model, 64, page_size=512, dtype=torch.float32).num_pages > 0
    with pytest.raises(AdapterLoadError, match=r"lora_B: weights up to 1e\+06 overflow float16"):
        read_adapter("huge", path, model, 64, page_size=512, dtype=torch.float16)


def test_pickle_adapter_is_never_loaded(tmp_path, base_and_adapter):
    base, good = base_and_adapter
    path = broken_copy(good, tmp_path / "pickle")
    os.rename(os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin"))
    with pytest.raises(AdapterLoadError, match="safetensors only"):
        load_adapter("pickle", path, ModelConfig.from_dir(base), max_lora_rank=64)


@pytest.mark.parametrize("name", ["../etc", "a/b", "a\\b", ".hidden", "", "a b", "a" * 256, "é" * 128])
def test_adapter_names_must_be_plain(name):
    with pytest.raises(InvalidRequestError):
        check_adapter_name(name)


def test_manager_resolves_roots_refcounts_and_evicts(tmp_path, base_and_adapter):
    base, good = base_and_adapter
    root = tmp_path / "root"
    for i, name in enumerate(("x", "y", "z")):  # other bytes each: the same bytes would share one copy
        broken_copy(good, root / name, edit_tensors=lambda t, i=i: t.update({k: v + i for k, v in t.items()}))
    model = ModelConfig.from_dir(base)
    probe = LoRAManager(model, {}, [str(root)], 64, 1 << 30, page_size=512, dtype=torch.float32, pin_memory=False)
    one = probe.acquire("x").num_bytes
    mgr = LoRAManager(model, {"good": good}, [str(root)], 64, max_host_bytes=2 * one, page_size=512,
                      dtype=torch.float32, pin_memory=False)
    with pytest.raises(AdapterNotFoundError) as caught:
        mgr.acquire("nope")
    assert str(caught.value) == "LoRA adapter 'nope' is not known"  # no other tenant's names, no paths
    x = mgr.acquire("x")
    mgr.release(mgr.acquire("y").key)  # references are per version (digest)
    mgr.acquire("z")  # over budget: evicts y (unreferenced), never x (held)
    stats = mgr.snapshot()
    assert stats.host_evictions_total == 1 and stats.num_host == 2 and stats.host_bytes == 2 * one
    assert mgr.acquire("x") is x and mgr.snapshot().host_hits_total == 1


def test_packing_is_rank_exact(base_and_adapter):
    """Pages in proportion to rank and modules: at most one partly filled page per adapter."""
    base, good = base_and_adapter
    model = ModelConfig.from_dir(base)
    adapter = load_adapter("good", good, model, 64)
    packed = pack_adapter(adapter, model, page_size=512, dtype=torch.float32)
    shapes = model.projection_shapes()
    exact = sum(8 * (shapes[m][0] + shapes[m][1]) for m in ("q_proj", "down_proj"))
    assert packed.num_pages == -(-exact // 512)
    assert packed.ranks["q_proj"] == 8 and packed.ranks["k_proj"] == 0
    a, b, _ = adapter.weights[1]["down_proj"]
    off = packed.b_offsets["down_proj"]
    n_out = shapes["down_proj"][1]
    assert torch.equal(packed.data[1, off:off + 8 * n_out].view(8, n_out), b.t())


@pytest.mark.parametrize("irregular", [False, True])
def test_packing_matches_layer_by_layer(tmp_path, base_and_adapter, irregular):
    """The grouped copies of a regular adapter, and the layer-by-layer path of an irregular one
    (a module missing in a layer, another rank in a layer, a layer-specific alpha, bf16 weights),
    both give what a plain per-layer copy gives."""
    base, good = base_and_adapter
    model = ModelConfig.from_dir(base)
    path = good
    if irregular:
        def edit(tensors):
            for key in [k for k in tensors if "layers.0." in k and "down_proj" in k]:
                del tensors[key]
            prefix = "base_model.model.model.layers.1.self_attn.q_proj"
            tensors[f"{prefix}.lora_A.weight"] = tensors[f"{prefix}.lora_A.weight"][:4].clone()
            tensors[f"{prefix}.lora_B.weight"] = tensors[f"{prefix}.lora_B.weight"][:, :4].clone()
            for key in tensors:
                tensors[key] = tensors[key].to(torch.bfloat16)
        path = broken_copy(good, tmp_path / "irregular", edit,
                           lambda cfg: cfg.update(alpha_pattern={"layers.1.q_proj": 12},
                                                  rank_pattern={"layers.1.self_attn.q_proj": 4}))
    adapter = load_adapter("x", path, model, 64)
    packed = pack_adapter(adapter, model, page_size=512, dtype=torch.float32)
    shapes = model.projection_shapes()
    expected = torch.zeros_like(packed.data)
    for layer, modules in enumerate(adapter.weights):
        for m, (a, b, scale) in modules.items():
            r, (n_in, n_out) = a.shape[0], shapes[m]
            b = b.float() * (scale / packed.scales[m])
            expected[layer, packed.a_offsets[m]:packed.a_offsets[m] + r * n_in] = a.float().reshape(-1)
            expected[layer, packed.b_offsets[m]:packed.b_offsets[m] + r * n_out] = b.t().reshape(-1)
    assert torch.equal(packed.data, expected)
    if irregular:
        assert "down_proj" not in adapter.weights[0] and adapter.weights[1]["q_proj"][0].shape[0] == 4
        assert adapter.weights[1]["q_proj"][2] != packed.scales["q_proj"]


def _load(path, base, dtype=torch.float32, root=None):
    return read_adapter("bad", str(path), ModelConfig.from_dir(base), max_lora_rank=64, page_size=512, dtype=dtype,
                        root=root)


@pytest.mark.parametrize("edit_config, message", [
    (lambda c: c.update(lora_alpha=1e6), r"layer 0 down_proj: scale lora_alpha/r = 1e\+06/8 = 125000 is not a finite number"),
    (lambda c: c.update(lora_alpha=float("nan")), r"scale lora_alpha/r = nan/8"),
    (lambda c: c.update(lora_alpha=float("inf")), r"scale lora_alpha/r = inf/8"),
    (lambda c: c.update(lora_alpha=-1e5), r"scale lora_alpha/r = -100000/8"),
    (lambda c: c.update(lora_alpha=1e5, use_rslora=True), r"scale lora_alpha/sqrt\(r\) = 100000/sqrt\(8\)"),
    (lambda c: c.update(alpha_pattern={"layers.1.q_proj": 1e9}), r"layer 1 q_proj: scale lora_alpha/r"),
    (lambda c: c.update(alpha_pattern={"layers.1.q_proj": "x"}), r"alpha_pattern: lora_alpha of"),
    (lambda c: c.update(alpha_pattern={"(": 2}), r"alpha_pattern"),
    (lambda c: c.update(alpha_pattern=[1]), r"alpha_pattern must be"),
    (lambda c: c.update(lora_alpha="many"), r"lora_alpha must be a number"),
    (lambda c: c.pop("lora_alpha") and c.update(r="x"), r"r must be an integer"),
])
def test_absurd_scales_are_refused_naming_the_field(tmp_path, base_and_adapter, edit_config, message):
    base, good = base_and_adapter
    path = broken_copy(good, tmp_path / "bad", edit_config=edit_config)
    with pytest.raises(AdapterLoadError, match=message) as caught:
        _load(path, base)
    assert str(caught.value).startswith("LoRA adapter 'bad': ") and str(tmp_path) not in str(caught.value)


def test_scales_at_the_limit_are_accepted(tmp_path, base_and_adapter):
    base, good = base_and_adapter
    path = broken_copy(good, tmp_path / "edge", edit_config=lambda c: c.update(lora_alpha=8e4))  # scale 1e4
    assert _load(path, base).scales["q_proj"] == 1e4


def _set_weights(a_value, b_value, a_rows=None, b_cols=None):
    """Every lora_A (rows ``a_rows``, default all) at a_value, every lora_B (columns ``b_cols``) at b_value."""
    def edit(tensors):
        for key in tensors:
            t = torch.zeros_like(tensors[key])
            if "lora_A" in key:
                t[slice(None) if a_rows is None else a_rows] = a_value
            else:
                t[:, slice(None) if b_cols is None else b_cols] = b_value
            tensors[key] = t
    return edit


def test_weight_updates_beyond_the_serving_dtype_are_refused(tmp_path, base_and_adapter, caplog):
    """scale * B @ A: the good adapter's scale is 4/8 and its rank 8, so A = B = 10 makes every
    entry of the update 400 and a row of q_proj's (64 inputs) sum to 25600, within float16's
    65504; B = 30 makes it 76800, beyond. Each entry alone is far within float16's range: the
    output over the input's width overflows."""
    base, good = base_and_adapter
    fits = broken_copy(good, tmp_path / "fits", _set_weights(10.0, 10.0))
    assert _load(fits, base, torch.float16).num_pages > 0
    over = broken_copy(good, tmp_path / "over", _set_weights(10.0, 30.0))
    with caplog.at_level("WARNING", logger="multilora"):
        with pytest.raises(AdapterLoadError, match=r"^LoRA adapter 'bad': layer 0 q_proj: scale \* lora_B @ lora_A "
                                                   r"gives outputs up to 7.68e\+04 for inputs of magnitude 1, beyond "
                                                   r"6.55e\+04, the largest activation float16") as caught:
            _load(over, base, torch.float16)
    assert str(tmp_path) not in str(caught.value)
    assert str(over) in caplog.text  # the path is in the server's log, not in the client's message
    assert _load(over, base, torch.float32).num_pages > 0
    assert _load(over, base, torch.bfloat16).num_pages > 0


def test_finite_updates_that_overflow_float32_downstream_are_refused(tmp_path, base_and_adapter):
    """Entries of 1e17 are finite in float32, and so is each entry of the update (4e34 here), but
    a hidden state of 1e19 or more overflows the next RMSNorm's square (float32 max 3.4e38): the
    limit for float32 and bfloat16 serving is the square root of float32's largest value."""
    base, good = base_and_adapter
    path = broken_copy(good, tmp_path / "huge", _set_weights(1e17, 1e17))
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(AdapterLoadError, match=r"lora_B @ lora_A gives outputs up to .* beyond 1.84e\+19"):
            _load(path, base, dtype)


def test_the_cheap_bound_alone_refuses_nothing(tmp_path, base_and_adapter):
    """A large only in row 0, B only in column 1: the bound (scale * r * max|A| * max|B| = 360000)
    is over float16's range, the product B @ A is zero: the exact check accepts it."""
    base, good = base_and_adapter
    path = broken_copy(good, tmp_path / "sparse", _set_weights(300.0, 300.0, a_rows=0, b_cols=1))
    packed = _load(path, base, torch.float16)
    assert packed.data.abs().max().item() == 300.0


def test_messages_name_the_adapter_never_its_path(tmp_path, base_and_adapter, caplog):
    base, good = base_and_adapter
    cases = {
        "nan": broken_copy(good, tmp_path / "nan", _nan),
        "missing": str(tmp_path / "missing"),
        "unreadable": broken_copy(good, tmp_path / "unreadable"),
    }
    os.makedirs(cases["missing"])
    weights = os.path.join(cases["unreadable"], "adapter_model.safetensors")
    os.remove(weights)
    os.mkdir(weights)  # a directory where the weights should be: reading it fails with an OSError
    os.makedirs(os.path.join(weights, "x"))
    for case, path in cases.items():
        with caplog.at_level("WARNING", logger="multilora"):
            with pytest.raises(AdapterLoadError) as caught:
                read_adapter(case, path, ModelConfig.from_dir(base), 64, page_size=512, dtype=torch.float32)
        assert str(caught.value).startswith(f"LoRA adapter '{case}': ")
        assert str(tmp_path) not in str(caught.value), caught.value
        assert path in caplog.text


def _manager(base, roots, **kwargs):
    return LoRAManager(ModelConfig.from_dir(base), {}, roots, 64, 1 << 30, page_size=512, dtype=torch.float32,
                       pin_memory=False, **kwargs)


def test_symlinks_inside_the_root_load_and_out_of_it_are_refused(tmp_path, base_and_adapter, caplog):
    base, good = base_and_adapter
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(good, root / "real")
    shutil.copytree(good, outside / "elsewhere")
    os.symlink("real", root / "alias")  # as bench/serving.py names adapters: a link inside the root
    os.symlink(outside / "elsewhere", root / "escape")  # the directory resolves outside
    os.makedirs(root / "file_escape")
    shutil.copy(os.path.join(good, "adapter_config.json"), root / "file_escape")
    os.symlink(outside / "elsewhere" / "adapter_model.safetensors", root / "file_escape" / "adapter_model.safetensors")
    os.makedirs(root / "file_inside")
    shutil.copy(os.path.join(good, "adapter_config.json"), root / "file_inside")
    os.symlink(root / "real" / "adapter_model.safetensors", root / "file_inside" / "adapter_model.safetensors")
    mgr = _manager(base, [str(root)])
    for name in ("real", "alias", "file_inside"):
        assert mgr.acquire(name).num_pages > 0
    for name, what in (("escape", "the adapter directory"), ("file_escape", "adapter_model.safetensors")):
        with caplog.at_level("WARNING", logger="multilora"):
            with pytest.raises(AdapterLoadError, match=f"^LoRA adapter '{name}': {what} is a symlink to outside "
                                                       "the adapter root .*allow_adapter_symlinks_outside_roots"
                               ) as caught:
                mgr.acquire(name)
        assert str(tmp_path) not in str(caught.value)
        assert str(outside) in caplog.text  # where it pointed: in the server's log
    # a refused load holds nothing; the three names hold the same bytes: one version, three references
    assert mgr._refs == {mgr.acquire("real").key: 4}
    allowed = _manager(base, [str(root)], allow_symlinks_outside_roots=True)
    assert allowed.acquire("escape").num_pages > 0 and allowed.acquire("file_escape").num_pages > 0


def test_multi_lora_json_paths_may_be_symlinks(tmp_path, base_and_adapter):
    """Adapters named in multi_lora.json are the operator's paths: no root to stay inside."""
    base, good = base_and_adapter
    os.symlink(good, tmp_path / "link")
    mgr = LoRAManager(ModelConfig.from_dir(base), {"linked": str(tmp_path / "link")}, [], 64, 1 << 30,
                      page_size=512, dtype=torch.float32, pin_memory=False)
    assert mgr.acquire("linked").num_pages > 0


def test_the_symlink_option_is_an_engine_config_boolean(base_and_adapter):
    from engine.config import EngineConfig
    base, _ = base_and_adapter
    assert EngineConfig(model=base).allow_adapter_symlinks_outside_roots is False
    assert EngineConfig.from_dict({"model": base, "allow_adapter_symlinks_outside_roots": "true"}
                                  ).allow_adapter_symlinks_outside_roots is True
    with pytest.raises(ValueError, match="allow_adapter_symlinks_outside_roots"):
        EngineConfig(model=base, allow_adapter_symlinks_outside_roots="yes")
