"""The defense arms of the harmful-fine-tuning protocol (benchmarks/hft): settings digests, wiring, end to end.

Each wiring test runs the arm on the tiny preset and checks, against a formula written out here, that the defense's
own step was applied to what the arm evaluates: a silent fall-back to plain LoRA fails every one of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NEW_ARMS = ("lisa", "booster", "antidote", "safe_lora", "resta")
#: settings digests of the presets as computed before the defense arms existed (commit 5a8f641); every arm without
#: its own fields must keep them, so finished runs of those arms still resume and pool
DIGESTS_BEFORE = {
    "cpu": "a44a47c3dfb80f610a76934c26cbbb6f218b91d0fed635d463aff2dc6108e3e1",
    "tiny": "b30ef167801fc7ea3b5a930dd76c9ec50b4d007905cc379b968031cb23aeff8d",
    "gpu": "a774d201a99720de0b35f56ca759db9fd63395804780597e33e48d7f52bba1e0",
}
OLD_ARMS = ("aligned", "lora", "replay", "spa_esi", "spa_random", "spa_esi_replay", "realign", "sppft", "rsn_tune")


# ------------------------------------------------------------------------------------------------ digests
@pytest.mark.parametrize("preset", sorted(DIGESTS_BEFORE))
def test_existing_arms_keep_their_settings_digest(preset):
    from benchmarks.hft.config import ARM_FIELDS, parse_args, settings_digest

    cfg = parse_args(["--preset", preset])
    # the digest as the code before the defense fields computed it: every field but the non-settings, hashed
    not_settings = {"preset", "out", "work_dir", "arms", "p", "seeds", "single_seed_arms", "p0_arms", "combine",
                    "report", "estimate", "max_runs", "progress"}  # fmt: skip
    old_fields = {k: v for k, v in asdict(cfg).items() if k not in not_settings and k not in ARM_FIELDS}
    by_hand = hashlib.sha256(json.dumps(old_fields, sort_keys=True).encode()).hexdigest()
    assert by_hand == DIGESTS_BEFORE[preset]
    for arm in OLD_ARMS:
        assert settings_digest(cfg, arm) == DIGESTS_BEFORE[preset], arm
    assert settings_digest(cfg) == DIGESTS_BEFORE[preset]
    # a defense field changes its own arms' digests only
    for name, arms in ARM_FIELDS.items():
        value = getattr(cfg, name)
        changed = replace(cfg, **{name: value + 1 if not isinstance(value, float) else value * 2 + 1})
        for arm in (*OLD_ARMS, *NEW_ARMS):
            same = settings_digest(changed, arm) == settings_digest(cfg, arm)
            assert same == (arm not in arms), (name, arm)
    assert len({settings_digest(cfg, a) for a in NEW_ARMS} | {DIGESTS_BEFORE[preset]}) == len(NEW_ARMS) + 1


def test_plan_includes_the_defense_arms():
    from benchmarks.hft.config import parse_args
    from benchmarks.hft.runner import plan

    runs, missing = plan(parse_args(["--preset", "cpu"]))
    ids = {r.id for r in runs}
    for arm in NEW_ARMS:
        assert {f"{arm}_p0.1_seed{s}" for s in range(3)} <= ids
    assert {r.arm for r in runs if r.p == 0} == {"lora", "replay", "spa_esi", "lisa"}
    assert missing == []
    assert plan(parse_args(["--preset", "cpu", "--arms", "lora,set_repair"]))[1] == ["set_repair"]


def test_estimate_counts_the_defenses_and_their_artifacts():
    from benchmarks.hft.config import parse_args
    from benchmarks.hft.estimate import defense_factors, estimate

    costs = {"step": 10.0, "step_batch": 4, "generate_prompt": 1.0, "generate_tokens": 64, "task_row": 0.5,
             "setup": 100.0, "masked_factor": 1.2}  # fmt: skip
    cfg = parse_args(["--preset", "cpu", "--curve_every", "0"])
    est = estimate(cfg, costs)
    per = est["per_run_s"]
    f = json.loads((ROOT / "benchmarks" / "results" / "defenses.json").read_text())
    smol = {r["arm"]: r for r in next(m for m in f["training"] if m["model"] == "smollm2-135m")["rows"]}
    assert defense_factors()["lisa"] == smol["lisa"]["step"]["median_s"] / smol["lora"]["step"]["median_s"]
    eval_s = 300 * 1.0 + 200 * 0.5  # 300 prompts at 64 tokens, 200 task rows
    assert per["lora_p0.1_seed0"] == pytest.approx(100 * 10.0 + eval_s, abs=0.1)
    assert per["lisa_p0.1_seed0"] == pytest.approx(100 * 10.0 * defense_factors()["lisa"] + eval_s, abs=0.1)
    assert per["spa_esi_p0.1_seed0"] == pytest.approx(100 * 10.0 * 1.2 + eval_s, abs=0.1)
    for arm in ("booster", "safe_lora", "resta", "realign"):
        assert per[f"{arm}_p0.1_seed0"] == per["lora_p0.1_seed0"], arm
    row = defense_factors()["antidote_row"]
    assert per["antidote_p0.1_seed0"] == pytest.approx(per["lora_p0.1_seed0"] + 64 * row * 10.0 / 4, abs=0.1)
    assert est["artifacts_s"] == pytest.approx({"booster": 100 * 10.0 * defense_factors()["booster"],
                                                "direction": 100 * 10.0}, abs=0.1)  # fmt: skip
    assert est["total_s"] == pytest.approx(sum(per.values()) + sum(est["artifacts_s"].values()) + 100.0, abs=0.5)
    assert estimate(parse_args(["--preset", "cpu", "--arms", "lora"]), costs)["artifacts_s"] == {}


# ------------------------------------------------------------------------------------------------ wiring
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset's model and data, an arm context maker, and plain LoRA's merged model of the same run."""
    from benchmarks.hft.arms import ARTIFACTS, ArmContext, finetune
    from benchmarks.hft.config import parse_args
    from benchmarks.hft.data import HFTData
    from benchmarks.hft.runner import _load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = parse_args(["--preset", "tiny", "--p", "0.25", "--curve_every", "0"])
    base, tok = _load_model(cfg)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    data = HFTData(cfg)
    work = tmp_path_factory.mktemp("arms")
    built: dict = {}

    def make(cfg_=cfg) -> ArmContext:
        def artifact(name):
            key = (name, json.dumps(asdict(cfg_), sort_keys=True))
            if key not in built:
                built[key] = ARTIFACTS[name](ArmContext(cfg_, base, tok, data, 0.0, 0, [], lambda n: None,
                                                        work / name, artifact))  # fmt: skip
            return built[key]

        return ArmContext(cfg_, base, tok, data, 0.25, 0, data.train_rows(0.25, 0), lambda n: None, work / "run",
                          artifact)  # fmt: skip

    lora, _ = finetune(make())
    yield cfg, base, make, lora
    torch.set_num_threads(threads)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def test_lisa_trains_alignment_rows_exactly_on_its_alignment_steps(tiny):
    from benchmarks.hft.arms import ARMS

    cfg, _, make, _lora = tiny
    ka, kf = 1, 2
    c = replace(cfg, lisa_alignment_steps=ka, lisa_task_steps=kf, steps=6)
    _model, info = ARMS["lisa"].build(make(c))
    kinds = info["batch_kinds"]
    assert len(kinds) == 6
    for s, k in enumerate(kinds):  # Lisa's schedule: alignment iff s mod (K_a + K_f) < K_a, alignment first
        assert (k == ["replay"]) == (s % (ka + kf) < ka), (s, kinds)
        assert "replay" not in k or k == ["replay"]
    assert info["rows_seen"]["replay"] == 2 * c.batch_size
    (lisa,) = [p for p in info["protections"] if p.get("protection") == "lisa"]
    assert lisa["steps"] == {"alignment": 2, "task": 4} and lisa["rho"] == c.lisa_rho
    assert info["leak"]["alignment_rows"] == {"harmbench": 0, "strongreject": 0, "lookalike": 0}


def test_booster_fine_tunes_the_model_its_alignment_run_hardened(tiny):
    from benchmarks.hft.arms import ARMS

    cfg, base, make, lora = tiny
    model, info = ARMS["booster"].build(make())
    hardened = make().artifact("booster")
    record = info["booster"]
    assert record["steps"] == cfg.booster_steps and record["rows_seen"]["replay"] == cfg.booster_steps * 4
    # the harmful-perturbation term ran: its losses were logged at every logging step
    assert record["booster_logs"] and all("safety/booster_loss_drop" in x for x in record["booster_logs"])
    assert all(v == 0 for leak in record["leak"].values() for v in leak.values())
    # the hardened model moved only the LoRA targets (a merged LoRA) and the arm fine-tuned it, not the aligned model
    w0, wh, wf, wl = _weights(base), _weights(hardened["model"]), _weights(model), _weights(lora)
    moved = {n for n in w0 if not torch.equal(w0[n], wh[n])}
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in moved)
    assert any(not torch.allclose(wf[n], wl[n]) for n in moved)
    # without the term (lambda 0), the same alignment run ends elsewhere
    plain = make(replace(cfg, booster_lambda=0.0)).artifact("booster")
    assert plain["info"]["digest"] != record["digest"]


def test_antidote_prunes_the_per_row_top_fraction_of_the_lora_factors(tiny):
    from benchmarks.hft.arms import ARMS, antidote_rows

    cfg, _, make, lora = tiny
    ctx = make()
    model, info = ARMS["antidote"].build(ctx)
    post = info["posthoc"]
    rows = antidote_rows(ctx)
    assert len(rows) == cfg.antidote_rows and not {r["prompt"] for r in rows} & {r["prompt"] for r in ctx.rows}
    assert all(r["kind"] == "harmful" for r in rows)
    # per output row, width - floor(width * (1 - fraction)) entries pruned (the reference's kept count)
    expected, total = 0, 0
    for out, width in _lora_factor_shapes(cfg).values():
        expected += out * (width - math.floor(width * (1 - cfg.antidote_fraction)))
        total += out * width
    assert post["pruned"] == expected and post["of"] == total
    wa, wl = _weights(model), _weights(lora)
    differ = [n for n in wa if not torch.equal(wa[n], wl[n])]
    assert differ and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in differ)


def _lora_factor_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of every LoRA factor of the tiny model's q/v projections, from its config."""
    from peft_safety.testing import tiny_llama

    model = tiny_llama(seed=0, num_hidden_layers=4)
    shapes = {}
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            shapes[f"{name}.lora_A"] = (cfg.lora_r, mod.in_features)
            shapes[f"{name}.lora_B"] = (mod.out_features, cfg.lora_r)
    return shapes


def test_safe_lora_projects_the_least_similar_layers_onto_the_direction(tiny):
    from benchmarks.hft.arms import ARMS

    cfg, base, make, lora = tiny
    model, info = ARMS["safe_lora"].build(make())
    delta = make().artifact("direction")["delta"]
    w0, ws, wl = _weights(base), _weights(model), _weights(lora)
    cos, expect = {}, {}
    for name in delta:
        v = delta[name].double()
        d = wl[name] - w0[name]  # plain LoRA's update of the same run
        c = v @ v.T / torch.linalg.norm(v)  # Safe LoRA's C, formed explicitly
        cos[name] = float(torch.nn.functional.cosine_similarity((c @ d).flatten(), d.flatten(), dim=0))
        expect[name] = c @ d
    chosen = sorted(cos, key=cos.get)[: cfg.safe_lora_top_k]
    assert sorted(info["posthoc"]["projected"]) == sorted(chosen)
    for name in delta:
        want = expect[name] if name in chosen else wl[name] - w0[name]
        torch.testing.assert_close(ws[name] - w0[name], want, atol=1e-6, rtol=1e-4)
    assert info["direction"]["digest"] and info["direction"]["leak"]["alignment_rows"]["harmbench"] == 0


def test_resta_adds_the_direction_to_the_merged_fine_tune(tiny):
    from benchmarks.hft.arms import ARMS

    cfg, _, make, lora = tiny
    c = replace(cfg, resta_scale=0.5)
    model, info = ARMS["resta"].build(make(c))
    delta = make(c).artifact("direction")["delta"]
    wr, wl = _weights(model), _weights(lora)
    assert set(delta) and info["resta"] == {"scale": 0.5, "weights": len(delta)}
    for name in wr:
        want = wl[name] + 0.5 * delta[name].double() if name in delta else wl[name]
        torch.testing.assert_close(wr[name], want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_grid_runs_resumes_and_pools_every_defense_arm(tmp_path):
    from benchmarks.hft.combine import combine
    from benchmarks.hft.config import parse_args, settings_digest
    from benchmarks.hft.runner import run_grid

    args = ["--preset", "tiny", "--arms", "aligned,lora," + ",".join(NEW_ARMS), "--p", "0.25", "--seeds", "0",
            "--out", str(tmp_path), "--work_dir", str(tmp_path / "work"), "--n_resamples", "200"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        done = run_grid(parse_args(args))
        assert done == ["aligned", "lora_p0.25_seed0", *(f"{a}_p0.25_seed0" for a in NEW_ARMS)]
        assert run_grid(parse_args(args)) == []  # resumed: every run's digests checked, nothing rerun
        with pytest.raises(RuntimeError, match=r"other settings \(differing: \['lisa_rho'\]\)"):
            run_grid(parse_args([*args, "--lisa_rho", "2"]))
    finally:
        torch.set_num_threads(threads)
    cfg = parse_args(args)
    for arm in NEW_ARMS:
        run = json.loads((tmp_path / "runs" / f"{arm}_p0.25_seed0.json").read_text())
        assert run["settings_digest"] == settings_digest(cfg, arm) != run["common_settings_digest"]
        assert run["common_settings_digest"] == DIGESTS_BEFORE["tiny"] and run["arm_settings"]
    lora = json.loads((tmp_path / "runs" / "lora_p0.25_seed0.json").read_text())
    assert lora["settings_digest"] == DIGESTS_BEFORE["tiny"] and lora["arm_settings"] == {}
    pooled = combine(tmp_path, n_resamples=200)
    assert {r["arm"] for r in pooled["results"]} == {"aligned", "lora", *NEW_ARMS}
    assert set(pooled["checks"]["arm_settings_digests"]) == set(NEW_ARMS)
    assert set(pooled["checks"]["artifact_digests"]) == {"booster", "direction"}
