"""Every graph in workflows/ loads with zero missing node types on the real server and runs.

The graphs name the models a user would have (e.g. sdxl_vae.safetensors, an SD1.5 checkpoint);
here the stock VAELoader is pointed at a seeded random TAESD-family VAE file written into the
server's models/vae (auto-detected by ComfyUI from its keys), CheckpointLoaderSimple and
CLIPTextEncode are swapped for the test kit's loader of the seeded tiny diffusion model (+ the
kl_f8_small VAE) and its text encoder, images are 128 px and steps are cut, so the test checks the
plumbing of the graphs as shipped, not quality. The last test chains the two Tree-Ring graphs:
the image and key JSON the embed graph produces are what the check graph reads.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

import core
from tests.support.server import ComfyServer
from tests.support.workflow import missing_node_types, to_api

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
TEST_VAE = "exact_encode_test_taesd.safetensors"
SIZE = 128  # px: 16x16 latents for the 8x VAEs
REPLACE = {"CheckpointLoaderSimple": "ExactEncodeTestCheckpointLoader",
           "CLIPTextEncode": "ExactEncodeTestConditioning"}
TEST_KEY = core.TreeRingKey((4, SIZE // 8, SIZE // 8), "ring", radius=5, channel=3, seed=12345)
OUTPUT_NODES = {"SaveImage", "PreviewImage", "PreviewAny", "ExactEncodeRoundTripDrift", "ExactEncodeImageMaskedError"}
MASKED_IMAGE = "example_masked.png"  # for Load Image nodes whose MASK output is used


@pytest.fixture(scope="module")
def server(host):
    from tests.support.models import write_random_taesd_file

    with ComfyServer() as s:
        write_random_taesd_file(s.base / "models", TEST_VAE, seed=3)
        with Image.open(s.image_source) as img:  # a centred SIZE px square of the test photo
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            square = img.convert("RGB").crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS)
        square.save(s.input_dir / "example.png")
        masked = square.convert("RGBA")  # Load Image's MASK is 1 - alpha: a transparent centre to inpaint
        alpha = Image.new("L", (SIZE, SIZE), 255)
        alpha.paste(0, (SIZE // 4, SIZE // 4, SIZE * 3 // 4, SIZE * 3 // 4))
        masked.putalpha(alpha)
        masked.save(s.input_dir / MASKED_IMAGE)
        yield s


def overrides_for(ui: dict, image: str = "example.png", kind: str = "eps", steps: int = 3,
                  encode_steps: int = 2, key_json: str | None = None) -> dict:
    """Test models, small images and few steps for any shipped graph, by node type."""
    by_type = {
        "VAELoader": {"vae_name": TEST_VAE},
        "LoadImage": {"image": image},
        "VAEExactEncode": {"steps": encode_steps},
        "VAEExactEncodeForInpaint": {"steps": encode_steps},
        "VAEExactEncodeTiled": {"steps": encode_steps, "tile_size": 64, "overlap": 32},  # 3 x 3 tiles at 128 px
        "VAEDecodeExactTiled": {"tile_size": 64, "overlap": 32},
        "ExactEncodeRoundTripDrift": {"steps": encode_steps, "generations": 2},
        "KSampler": {"steps": steps},
        "ImageScaleBy": {"scale_by": 1.5},
        "CheckpointLoaderSimple": {"kind": kind},
        "EmptyLatentImage": {"width": SIZE, "height": SIZE},
        "BasicScheduler": {"steps": steps},
        "ExactEncodeDiffusionInversion": {"steps": steps},
        "ExactEncodeTreeRingKey": {"radius": TEST_KEY.radius},
        "ExactEncodeTreeRingDetect": {"key_json": key_json or TEST_KEY.to_json()},
    }
    out = {n["id"]: dict(by_type[n["type"]]) for n in ui["nodes"] if n["type"] in by_type}
    for n in ui["nodes"]:
        if n["type"] == "LoadImage" and image == "example.png" and any(
                o["name"] == "MASK" and o.get("links") for o in n["outputs"]):
            out[n["id"]]["image"] = MASKED_IMAGE
    return out


def run_graph(server, ui, overrides):
    info = server.get("/object_info")
    prompt = to_api(ui, info, overrides, replace=REPLACE)
    entry = server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    return prompt, entry


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ must ship at least one graph"
    names = {p.name for p in WORKFLOWS}
    assert {"treering_embed.json", "treering_check.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_has_no_missing_nodes_and_runs(path, server):
    ui = json.loads(path.read_text())
    assert missing_node_types(ui, server.get("/object_info")) == []
    assert any(n["type"] in ("Note", "MarkdownNote") for n in ui["nodes"]), "graphs explain themselves in a Note"
    prompt, entry = run_graph(server, ui, overrides_for(ui))
    outputs = [n for n in prompt if prompt[n]["class_type"] in OUTPUT_NODES]
    assert outputs and all(n in entry["outputs"] for n in outputs), entry["outputs"]
    saved = [f for n in prompt if prompt[n]["class_type"] == "SaveImage" for f in server.output_files(entry, n)]
    assert all(f.exists() for f in saved)
    for n in prompt:
        if prompt[n]["class_type"] == "ExactEncodeTreeRingDetect":
            previews = [m for m in prompt if prompt[m]["class_type"] == "PreviewAny"
                        and prompt[m]["inputs"]["source"] == [n, 2]]
            assert previews and entry["outputs"][previews[0]]["text"][0].startswith("image 0:")


CHAIN_CFG = 1.0


def test_embed_then_check_on_the_server(server):
    """treering_embed.json (tiny flow model, 10 euler steps, key on all channels, cfg 1) -> its PNG
    and printed key JSON -> treering_check.json with the generation's prompt and cfg, 50 exact-encode
    steps. With the random model, cfg > 1 amplifies its random cond/uncond difference and the key
    does not survive the VAE round trip (measured in-process, stock encode + naive inversion:
    p = 7e-14 at cfg 1, 3e-4 at cfg 3, 0.73..0.998 at cfg 7), hence cfg 1 here."""
    embed = json.loads((WORKFLOWS[0].parent / "treering_embed.json").read_text())
    overrides = overrides_for(embed, kind="flow", steps=10)
    for n in embed["nodes"]:
        if n["type"] == "ExactEncodeTreeRingKey":
            overrides[n["id"]]["channel"] = -1
        elif n["type"] == "CFGGuider":  # the random model's cond/uncond difference, x7, swamps the key
            overrides[n["id"]] = {"cfg": CHAIN_CFG}
    prompt, entry = run_graph(server, embed, overrides)
    saved = [f for n in prompt if prompt[n]["class_type"] == "SaveImage" for f in server.output_files(entry, n)]
    assert len(saved) == 1
    with Image.open(saved[0]) as img:
        assert img.size == (SIZE, SIZE)
    key_node = next(n for n in prompt if prompt[n]["class_type"] == "PreviewAny")
    key_json = entry["outputs"][key_node]["text"][0]
    key = core.TreeRingKey.from_json(key_json)
    assert key.shape == (4, SIZE // 8, SIZE // 8) and key.radius == TEST_KEY.radius

    check = json.loads((WORKFLOWS[0].parent / "treering_check.json").read_text())
    image = server.add_input(saved[0], "embedded.png")
    overrides = overrides_for(check, image=image, kind="flow", steps=10, encode_steps=50, key_json=key_json)
    embed_text = next(n for n in embed["nodes"] if n["type"] == "CLIPTextEncode")["widgets_values"][0]
    embed_cfg = CHAIN_CFG
    for n in check["nodes"]:
        if n["type"] == "ExactEncodeDiffusionInversion":
            overrides[n["id"]]["cfg"] = embed_cfg
        elif n["type"] == "CLIPTextEncode" and n.get("title", "").startswith("Prompt"):
            overrides[n["id"]] = {"text": embed_text}
    prompt, entry = run_graph(server, check, overrides)
    verdicts = {}
    for n in prompt:
        if prompt[n]["class_type"] == "PreviewAny":
            text = entry["outputs"][n]["text"][0]
            title = next(x.get("title", "") for x in check["nodes"] if str(x["id"]) == n)
            verdicts[title] = text
            print(f"\n{title}: {text}")
    assert len(verdicts) == 2
    p = {t: float(re.search(r"p = ([0-9.e+-]+)", v).group(1)) for t, v in verdicts.items()}
    exact, plain = p["Verdict (exact encode)"], p["Verdict (stock encode)"]
    assert exact < 1e-6 and exact <= plain  # measured: 1.2e-19 vs 3.2e-17


TRAINED_SIZE = 64  # px: the trained model's 8 x 8 latents (tests/data/tiny_ldm/README.md)
# The key a user should pick at this size (bench/results/*-watermark-radius3.md): a rand key on every
# channel at the largest radius 8 x 8 allows; ring keys carry far less (a few real values per channel).
TRAINED_KEY = {"pattern": "rand", "radius": 3, "channel": -1}


def _embed_on_the_trained_model(server, watermarked: bool):
    """treering_embed.json on the trained tiny model (64 px, 10 euler steps, cfg 1, TRAINED_KEY);
    `watermarked=False` swaps Tree-Ring Watermarked Noise for stock Random Noise (same
    seed), i.e. a clean generation. Returns (PNG path, key JSON)."""
    embed = json.loads((WORKFLOWS[0].parent / "treering_embed.json").read_text())
    overrides = overrides_for(embed, kind="trained", steps=10)
    for n in embed["nodes"]:
        if n["type"] == "ExactEncodeTreeRingKey":
            overrides[n["id"]].update(TRAINED_KEY)
        elif n["type"] == "EmptyLatentImage":
            overrides[n["id"]].update(width=TRAINED_SIZE, height=TRAINED_SIZE)
        elif n["type"] == "CFGGuider":
            overrides[n["id"]] = {"cfg": 1.0}
    info = server.get("/object_info")
    prompt = to_api(embed, info, overrides, replace=REPLACE)
    if not watermarked:
        node = next(k for k, v in prompt.items() if v["class_type"] == "ExactEncodeTreeRingWatermarkedNoise")
        prompt[node] = {"class_type": "RandomNoise", "inputs": {"noise_seed": prompt[node]["inputs"]["noise_seed"]}}
    entry = server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    saved = [f for n in prompt if prompt[n]["class_type"] == "SaveImage" for f in server.output_files(entry, n)]
    key_node = next(n for n in prompt if prompt[n]["class_type"] == "PreviewAny")
    return saved[0], entry["outputs"][key_node]["text"][0]


def _check_on_the_trained_model(server, image_path, key_json, name: str) -> dict:
    """treering_check.json on the trained model with naive inversion: {title of the verdict: p-value}."""
    check = json.loads((WORKFLOWS[0].parent / "treering_check.json").read_text())
    image = server.add_input(image_path, name)
    overrides = overrides_for(check, image=image, kind="trained", steps=10, encode_steps=20, key_json=key_json)
    for n in check["nodes"]:
        if n["type"] == "ExactEncodeDiffusionInversion":
            overrides[n["id"]].update(cfg=1.0, mode="naive")
    prompt, entry = run_graph(server, check, overrides)
    p = {}
    for n in prompt:
        if prompt[n]["class_type"] == "PreviewAny":
            title = next(x.get("title", "") for x in check["nodes"] if str(x["id"]) == n)
            text = entry["outputs"][n]["text"][0]
            print(f"\n{name} {title}: {text}")
            p[title] = float(re.search(r"p = ([0-9.e+-]+)", text).group(1))
    return p


def test_watermark_workflows_on_the_trained_model(server):
    """The shipped embed and check graphs on the trained tiny model (a genuinely trained denoiser,
    tests/data/tiny_ldm/): the watermarked generation is detected through the exact-encode branch, a
    clean generation with the same seed is not (Tree-Ring Detect's verdict at FPR 1 %). Settings of
    the bench's best cell: naive inversion, 10 steps, rand key radius 3 on every channel, where
    `python -m bench.watermark --n 16 --radius 3 --encoders stock default --attacks none --tag radius3`
    measured p < 0.01 on 15/16 watermarked and 0/32 clean images with the default encoder (exact
    inversion: 3/16; through the VAE it amplifies the latent's remaining error)."""
    marked, key_json = _embed_on_the_trained_model(server, watermarked=True)
    clean, _ = _embed_on_the_trained_model(server, watermarked=False)
    key = core.TreeRingKey.from_json(key_json)
    assert key.shape == (4, TRAINED_SIZE // 8, TRAINED_SIZE // 8) and key.radius == TRAINED_KEY["radius"]
    p_marked = _check_on_the_trained_model(server, marked, key_json, "trained_marked.png")
    p_clean = _check_on_the_trained_model(server, clean, key_json, "trained_clean.png")
    assert p_marked["Verdict (exact encode)"] < 0.01, p_marked
    assert p_clean["Verdict (exact encode)"] >= 0.01, p_clean
    assert p_clean["Verdict (stock encode)"] >= 0.01, p_clean


def test_object_info_lists_the_treering_nodes(server):
    info = server.get("/object_info")
    assert info["ExactEncodeTreeRingKey"]["output"] == ["WATERMARK_KEY", "STRING"]
    assert info["ExactEncodeTreeRingWatermarkedNoise"]["output"] == ["NOISE", "LATENT"]
    assert info["ExactEncodeTreeRingDetect"]["output"] == ["FLOAT", "FLOAT", "STRING", "IMAGE"]
    assert info["ExactEncodeDiffusionInversion"]["output"] == ["LATENT", "STRING"]
    inv = info["ExactEncodeDiffusionInversion"]["input"]
    assert {"model", "positive", "negative", "cfg", "steps", "scheduler", "latent", "mode"} == set(inv["required"])
    assert {"iterations", "tolerance", "sigmas"} == set(inv["optional"])
    assert inv["required"]["steps"][1]["min"] == 1


def test_diffusion_inversion_steps_zero_is_a_validation_error(server):
    check = json.loads((WORKFLOWS[0].parent / "treering_check.json").read_text())
    overrides = overrides_for(check)
    nodes = [n["id"] for n in check["nodes"] if n["type"] == "ExactEncodeDiffusionInversion"]
    for node in nodes:  # both branches, else ComfyUI runs the valid one and reports the other
        overrides[node]["steps"] = 0
    reply = server.post_prompt(to_api(check, server.get("/object_info"), overrides, replace=REPLACE))
    assert reply["http_status"] == 400, reply
    for node in nodes:
        errors = reply["node_errors"][str(node)]["errors"]
        assert any(e["type"] == "value_smaller_than_min" and e["extra_info"]["input_name"] == "steps"
                   for e in errors), errors


def test_corrupt_key_json_fails_at_execution_naming_the_fix(server):
    check = json.loads((WORKFLOWS[0].parent / "treering_check.json").read_text())
    prompt = to_api(check, server.get("/object_info"), overrides_for(check, key_json='{"format": "tree-ring-key"'),
                    replace=REPLACE)
    reply = server.post_prompt(prompt)
    assert reply["http_status"] == 200, reply
    entry = server.wait_history(reply["prompt_id"], timeout=120)
    from tests.support.server import execution_error

    error = execution_error(entry)
    assert error is not None and error["node_type"] == "ExactEncodeTreeRingDetect", entry["status"]
    assert ("key: not valid JSON" in error["exception_message"]
            and "paste the complete JSON" in error["exception_message"])


def drift_rows(report: str) -> dict[int, tuple[float, float]]:
    """generation -> (stock dB, exact dB) from VAE Round-Trip Drift's report."""
    return {int(line.split()[0]): (float(line.split()[1]), float(line.split()[2]))
            for line in report.splitlines() if line.strip()[:1].isdigit()}


def test_drift_workflow_on_real_taef2_exact_beats_stock_after_five_generations(server):
    """round_trip_drift.json as shipped (5 generations), Load VAE swapped for the real TAEF2 weights,
    the 128 px test photo, 5 exact-encode steps per generation to keep CI short."""
    ui = json.loads((WORKFLOWS[0].parent / "round_trip_drift.json").read_text())
    overrides = overrides_for(ui)
    drift = next(n["id"] for n in ui["nodes"] if n["type"] == "ExactEncodeRoundTripDrift")
    loader = next(n["id"] for n in ui["nodes"] if n["type"] == "VAELoader")
    overrides[drift] = {"steps": 5}  # generations stay as shipped
    overrides[loader] = {"name": "taef2"}
    prompt = to_api(ui, server.get("/object_info"), overrides,
                    replace={**REPLACE, "VAELoader": "ExactEncodeTestVAELoader"})
    assert prompt[str(drift)]["inputs"]["generations"] == 5
    entry = server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{server.log_tail()}"
    report = entry["outputs"][str(drift)]["text"][0]
    print("\n" + report)
    rows = drift_rows(report)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    stock, exact = rows[5]
    assert exact > stock
    assert all(rows[g][0] > rows[g + 1][0] for g in range(1, 5))  # stock drift compounds
    images = [n for n in prompt if prompt[n]["class_type"] == "PreviewImage"]
    assert all(entry["outputs"][n]["images"] for n in images)


def test_inpaint_workflow_keeps_the_unmasked_area(server):
    """inpaint_exact.json on the masked test photo (centre square), tiny seeded model (cfg 1, denoise 0.3), kl_f8_small:
    composited outputs are identical to the original outside the mask; decoded ones are not, and the
    exact branch's error there is below the stock branch's."""
    ui = json.loads((WORKFLOWS[0].parent / "inpaint_exact.json").read_text())
    overrides = overrides_for(ui, encode_steps=20)
    for n in ui["nodes"]:
        if n["type"] == "KSampler":
            # The random model's denoised latent inside the mask grows to ~40x the image latent's range at
            # denoise 0.9 (measured max 225 vs 5.7): the decoder's group norms then spread it over the whole
            # 16x16-latent image (PSNR outside the mask ~11 dB for both branches). At denoise 0.3 it stays
            # in range (max 13), so the comparison measures the encoders, as with a real model.
            overrides[n["id"]].update(cfg=CHAIN_CFG, denoise=0.3)
    prompt, entry = run_graph(server, ui, overrides)
    results = {}
    for n in ui["nodes"]:
        if n["type"] == "ExactEncodeImageMaskedError":
            text = entry["outputs"][str(n["id"])]["text"][0]
            results[n["title"].split(":")[0]] = text
            print(f"\n{n['title']}: {text}")
    assert len(results) == 4
    for branch in ("exact", "stock"):
        assert "PSNR inf (identical), max abs error 0.0000" in results[f"{branch}, composited"]
    psnr = {k: float(re.search(r"PSNR ([0-9.]+) dB", v).group(1)) for k, v in results.items() if "decoded" in k}
    assert psnr["exact, decoded"] > psnr["stock, decoded"]


PACK_PREFIXES = ("ExactEncode", "VAEExactEncode", "VAEDecodeExactTiled")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_widget_values_fit_the_node_schemas(path, host):
    """The shipped graphs are kept as JSON (no generator repeats the schemas): every node's widget
    values must be exactly the widgets its schema has (required, then optional; a seed's
    control_after_generate and Load Image's upload take one more), and every combo value of this
    pack's nodes must be one of its options, so a schema change cannot leave a graph behind silently.
    Checked in-process for this pack's nodes and the core ComfyUI nodes (not comfy_extras)."""
    from tests.support.workflow import UI_ONLY_TYPES, _is_widget

    ui = json.loads(path.read_text())
    for node in ui["nodes"]:
        if node["type"] in UI_ONLY_TYPES or node["type"].startswith("ExactEncodeTest"):
            continue
        cls = host.nodes.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:  # comfy_extras nodes: not loaded in-process; the server test runs them
            assert not node["type"].startswith(PACK_PREFIXES), node["type"]
            continue
        spec = cls.INPUT_TYPES()
        specs = {**spec.get("required", {}), **spec.get("optional", {})}
        widgets = [(name, s) for name, s in specs.items() if _is_widget(s)]
        extra = sum(1 for _, s in widgets if len(s) > 1 and isinstance(s[1], dict)
                    and (s[1].get("control_after_generate") or s[1].get("image_upload")))
        values = node.get("widgets_values") or []
        assert len(values) == len(widgets) + extra, (path.name, node["type"], [n for n, _ in widgets], values)
        if node["type"].startswith(PACK_PREFIXES):
            for (name, s), value in zip(widgets, values):
                options = s[0] if isinstance(s[0], list) else (s[1].get("options") if len(s) > 1 else None)
                assert options is None or value in options, (path.name, node["type"], name, value, options)
