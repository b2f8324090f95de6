"""Writes the editing workflows (round-trip drift, img2img, inpainting, upscale-and-refine) and the
tiled exact round trip into
workflows/ in the frontend's UI format. Run it after changing a graph here:
    python scripts/build_workflows.py
Widget values follow each node's widget order (required inputs, then optional)."""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workflows"

OUTPUTS = {
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "VAELoader": [("VAE", "VAE")],
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "VAEEncode": [("LATENT", "LATENT")],
    "SetLatentNoiseMask": [("LATENT", "LATENT")],
    "ImageCompositeMasked": [("IMAGE", "IMAGE")],
    "ImageScaleBy": [("IMAGE", "IMAGE")],
    "VAEExactEncode": [("LATENT", "LATENT"), ("summary", "STRING")],
    "VAEExactEncodeForInpaint": [("LATENT", "LATENT"), ("summary", "STRING")],
    "VAEExactEncodeTiled": [("LATENT", "LATENT"), ("summary", "STRING")],
    "VAEDecodeExactTiled": [("IMAGE", "IMAGE")],
    "VAEEncodeTiled": [("LATENT", "LATENT")],
    "VAEDecodeTiled": [("IMAGE", "IMAGE")],
    "VAERoundTripDrift": [("stock", "IMAGE"), ("exact", "IMAGE"), ("side_by_side", "IMAGE"), ("plot", "IMAGE"),
                          ("report", "STRING")],
    "ImageMaskedError": [("psnr", "FLOAT"), ("max_abs_error", "FLOAT"), ("report", "STRING")],
    "PreviewImage": [], "SaveImage": [], "Note": [],
}
INPUTS = {
    "CLIPTextEncode": [("clip", "CLIP")],
    "KSampler": [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")],
    "VAEDecode": [("samples", "LATENT"), ("vae", "VAE")],
    "VAEEncode": [("pixels", "IMAGE"), ("vae", "VAE")],
    "SetLatentNoiseMask": [("samples", "LATENT"), ("mask", "MASK")],
    "ImageCompositeMasked": [("destination", "IMAGE"), ("source", "IMAGE"), ("mask", "MASK")],
    "ImageScaleBy": [("image", "IMAGE")],
    "VAEExactEncode": [("pixels", "IMAGE"), ("vae", "VAE")],
    "VAEExactEncodeForInpaint": [("pixels", "IMAGE"), ("vae", "VAE"), ("mask", "MASK")],
    "VAEExactEncodeTiled": [("pixels", "IMAGE"), ("vae", "VAE")],
    "VAEDecodeExactTiled": [("samples", "LATENT"), ("vae", "VAE")],
    "VAEEncodeTiled": [("pixels", "IMAGE"), ("vae", "VAE")],
    "VAEDecodeTiled": [("samples", "LATENT"), ("vae", "VAE")],
    "VAERoundTripDrift": [("image", "IMAGE"), ("vae", "VAE")],
    "ImageMaskedError": [("reference", "IMAGE"), ("image", "IMAGE"), ("mask", "MASK")],
    "PreviewImage": [("images", "IMAGE")], "SaveImage": [("images", "IMAGE")],
}


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, pos, widgets=(), title=None, size=(320, 120)):
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in INPUTS.get(type_, [])],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(OUTPUTS[type_])],
                "properties": {} if type_ == "Note" else {"Node name for S&R": type_},
                "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def connect(self, src, slot, dst, name):
        link_id = len(self.links) + 1
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        out = s["outputs"][slot]
        inp = next(i for i in d["inputs"] if i["name"] == name)
        assert inp["type"] == out["type"], (s["type"], out, d["type"], inp)
        inp["link"] = link_id
        out["links"].append(link_id)
        self.links.append([link_id, src, slot, dst, d["inputs"].index(inp), out["type"]])

    def note(self, pos, text, size=(420, 300)):
        return self.add("Note", pos, [text], size=size)

    def save(self, name):
        data = {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}
        (OUT / name).write_text(json.dumps(data, indent=2) + "\n")


CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SEED = 42


def text_encoders(g, ckpt, positive, x=420, y=40):
    pos = g.add("CLIPTextEncode", (x, y), [positive], title="Positive prompt", size=(360, 120))
    neg = g.add("CLIPTextEncode", (x, y + 170), ["blurry, low quality"], title="Negative prompt", size=(360, 120))
    g.connect(ckpt, 1, pos, "clip")
    g.connect(ckpt, 1, neg, "clip")
    return pos, neg


def sampler(g, ckpt, pos, neg, latent, denoise, pos_xy, steps=20):
    k = g.add("KSampler", pos_xy, [SEED, "fixed", steps, 7.0, "euler", "normal", denoise], size=(320, 262))
    g.connect(ckpt, 0, k, "model")
    g.connect(pos, 0, k, "positive")
    g.connect(neg, 0, k, "negative")
    g.connect(latent, 0, k, "latent_image")
    return k


def drift():
    g = Graph()
    img = g.add("LoadImage", (40, 120), ["example.png", "image"], size=(320, 360))
    vae = g.add("VAELoader", (40, 520), ["sdxl_vae.safetensors"], size=(320, 60))
    d = g.add("VAERoundTripDrift", (420, 120), [5, 100, "anderson"], size=(360, 240))
    g.connect(img, 0, d, "image")
    g.connect(vae, 0, d, "vae")
    side = g.add("PreviewImage", (840, 40), title="original | stock VAE Encode | VAE Exact Encode", size=(560, 260))
    plot = g.add("PreviewImage", (840, 340), title="PSNR per generation", size=(560, 400))
    g.connect(d, 2, side, "images")
    g.connect(d, 3, plot, "images")
    g.note((40, 640), (
        "Round-trip drift: why every editing pass costs quality, and what exact encoding saves.\n\n"
        "Each img2img or inpaint pass encodes the current image and decodes the result. The plain encoder's "
        "decode D(E(x)) is not x, and the error compounds over passes (faces, colour and saturation drift). "
        "VAE Round-Trip Drift runs `generations` passes in a row with stock VAE Encode and with VAE Exact "
        "Encode and plots PSNR against the original per generation; the report lists the numbers.\n\n"
        "Load: your image in Load Image; a VAE in Load VAE (here sdxl_vae.safetensors from models/vae; "
        "ae.safetensors for FLUX.1, or the VAE of your SD1.5 checkpoint: any 2-D image VAE). 100 steps per "
        "generation follow the paper; fewer are faster and still better than stock."), size=(740, 240))
    g.save("round_trip_drift.json")


def img2img():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (40, 40), [CHECKPOINT], size=(320, 100))
    img = g.add("LoadImage", (40, 200), ["example.png", "image"], size=(320, 360))
    pos, neg = text_encoders(g, ckpt, "a photograph, sharp focus, natural colours")
    enc = g.add("VAEExactEncode", (420, 380), [100, "anderson", 1.0, "auto", 0.0, False], size=(360, 260))
    g.connect(img, 0, enc, "pixels")
    g.connect(ckpt, 2, enc, "vae")
    k = sampler(g, ckpt, pos, neg, enc, 0.5, (840, 40))
    dec = g.add("VAEDecode", (840, 360), size=(220, 50))
    g.connect(k, 0, dec, "samples")
    g.connect(ckpt, 2, dec, "vae")
    save = g.add("SaveImage", (1200, 40), ["img2img_exact"], size=(360, 400))
    g.connect(dec, 0, save, "images")
    g.note((40, 620), (
        "img2img with exact encoding.\n\nVAE Exact Encode replaces VAE Encode: the latent the sampler starts "
        "from decodes back to your image, so what denoise does not change is not degraded by the VAE "
        "(at low denoise the result keeps the input's detail and colour instead of the encoder's drift).\n\n"
        f"Load: an SD1.5 checkpoint in Load Checkpoint (here {CHECKPOINT} from models/checkpoints; any "
        "checkpoint works, its VAE is used) and your image in Load Image. Denoise 0.5 here; lower keeps more."),
        size=(740, 220))
    g.save("img2img_exact.json")


def inpaint():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (40, 40), [CHECKPOINT], size=(320, 100))
    img = g.add("LoadImage", (40, 200), ["example.png", "image"], size=(320, 360))
    pos, neg = text_encoders(g, ckpt, "a red apple")
    enc = g.add("VAEExactEncodeForInpaint", (420, 380), [6, 100, "anderson", "keep"], size=(360, 220),
                title="VAE Exact Encode (for Inpaint)")
    g.connect(img, 0, enc, "pixels")
    g.connect(ckpt, 2, enc, "vae")
    g.connect(img, 1, enc, "mask")
    stock = g.add("VAEEncode", (420, 640), size=(220, 50), title="stock VAE Encode")
    g.connect(img, 0, stock, "pixels")
    g.connect(ckpt, 2, stock, "vae")
    noise_mask = g.add("SetLatentNoiseMask", (420, 730), size=(220, 50))
    g.connect(stock, 0, noise_mask, "samples")
    g.connect(img, 1, noise_mask, "mask")
    results = {}
    for row, (name, latent) in enumerate((("exact", enc), ("stock", noise_mask))):
        y = 40 + row * 620
        k = sampler(g, ckpt, pos, neg, latent, 0.9, (840, y))
        dec = g.add("VAEDecode", (840, y + 320), size=(220, 50))
        g.connect(k, 0, dec, "samples")
        g.connect(ckpt, 2, dec, "vae")
        comp = g.add("ImageCompositeMasked", (1200, y + 320), [0, 0, False], size=(300, 140),
                     title=f"{name}: paste into the original")
        g.connect(img, 0, comp, "destination")
        g.connect(dec, 0, comp, "source")
        g.connect(img, 1, comp, "mask")
        raw = g.add("SaveImage", (1200, y), [f"inpaint_{name}"], size=(300, 300), title=f"{name}: decoded")
        g.connect(dec, 0, raw, "images")
        final = g.add("SaveImage", (1540, y), [f"inpaint_{name}_composite"], size=(300, 300),
                      title=f"{name}: composited")
        g.connect(comp, 0, final, "images")
        for i, (what, src) in enumerate((("decoded", dec), ("composited", comp))):
            err = g.add("ImageMaskedError", (1880, y + i * 280), ["outside mask", 16], size=(360, 240),
                        title=f"{name}, {what}: error outside the mask")
            g.connect(img, 0, err, "reference")
            g.connect(src, 0, err, "image")
            g.connect(img, 1, err, "mask")
        results[name] = dec
    g.note((40, 620), (
        "Inpainting that keeps the unmasked area.\n\n"
        "Top: VAE Exact Encode (for Inpaint) encodes the image so that its decode reproduces it outside the "
        "mask, and attaches the grown mask as noise_mask like stock VAE Encode (for Inpainting). Bottom, for "
        "comparison: stock VAE Encode + Set Latent Noise Mask. The sampler only regenerates the masked latent; "
        "the rest is decoded from the encoder's latent, so with the stock encoder the kept area already "
        "drifts (colour, saturation, detail), and repeated passes add up.\n"
        "ImageCompositeMasked then pastes the decode into the original inside the mask: outside it the "
        "original pixels come back unchanged. Image Error (Masked) shows the error outside the mask (grown by "
        "16 px to leave out the seam band the sampler may change) for each: decoded and composited.\n\n"
        f"Load: an SD1.5 checkpoint (here {CHECKPOINT} from models/checkpoints; an inpainting checkpoint works "
        "too, set masked_area to grey and denoise 1.0) and your image in Load Image; right-click it, "
        "Open in MaskEditor, and paint the area to regenerate."), size=(740, 330))
    g.save("inpaint_exact.json")


def upscale_refine():
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (40, 40), [CHECKPOINT], size=(320, 100))
    img = g.add("LoadImage", (40, 200), ["example.png", "image"], size=(320, 360))
    pos, neg = text_encoders(g, ckpt, "a photograph, sharp focus, fine detail")
    up = g.add("ImageScaleBy", (420, 380), ["lanczos", 2.0], size=(300, 80))
    g.connect(img, 0, up, "image")
    enc = g.add("VAEExactEncode", (420, 500), [100, "anderson", 1.0, "auto", 0.0, False], size=(360, 260))
    g.connect(up, 0, enc, "pixels")
    g.connect(ckpt, 2, enc, "vae")
    k = sampler(g, ckpt, pos, neg, enc, 0.35, (840, 40))
    dec = g.add("VAEDecode", (840, 360), size=(220, 50))
    g.connect(k, 0, dec, "samples")
    g.connect(ckpt, 2, dec, "vae")
    save = g.add("SaveImage", (1200, 40), ["upscale_refine_exact"], size=(360, 400))
    g.connect(dec, 0, save, "images")
    g.note((40, 800), (
        "Upscale and refine with exact encoding.\n\nThe image is upscaled in pixel space (Lanczos x2), encoded "
        "exactly and refined at low denoise (0.35): the sampler adds detail while the rest of the picture is "
        "not softened or colour-shifted by the VAE round trip.\n\n"
        f"Load: an SD1.5 checkpoint (here {CHECKPOINT} from models/checkpoints) and your image in Load Image. "
        "For large outputs, fewer exact-encode steps (e.g. 30) keep it fast."), size=(740, 200))
    g.save("upscale_refine_exact.json")


def tiled_round_trip():
    g = Graph()
    img = g.add("LoadImage", (40, 120), ["example.png", "image"], size=(320, 360))
    vae = g.add("VAELoader", (40, 520), ["sdxl_vae.safetensors"], size=(320, 60))
    tile = [512, 64]  # tile_size, overlap: the decoder must get the encoder's values
    enc = g.add("VAEExactEncodeTiled", (420, 40), tile + [64, 8, 100, "anderson", 1.0, "auto"],
                title="VAE Exact Encode (Tiled)", size=(360, 330))
    dec = g.add("VAEDecodeExactTiled", (820, 40), tile + ["auto"], title="VAE Decode (Exact Tiled)", size=(300, 130))
    g.connect(img, 0, enc, "pixels")
    g.connect(vae, 0, enc, "vae")
    g.connect(enc, 0, dec, "samples")
    g.connect(vae, 0, dec, "vae")
    exact = g.add("SaveImage", (1160, 40), ["exact_tiled_round_trip"], title="exact tiled round trip", size=(400, 400))
    g.connect(dec, 0, exact, "images")
    s_enc = g.add("VAEEncodeTiled", (420, 420), tile + [64, 8], size=(300, 150))
    s_dec = g.add("VAEDecodeTiled", (820, 420), tile + [64, 8], size=(300, 150))
    g.connect(img, 0, s_enc, "pixels")
    g.connect(vae, 0, s_enc, "vae")
    g.connect(s_enc, 0, s_dec, "samples")
    g.connect(vae, 0, s_dec, "vae")
    plain = g.add("PreviewImage", (1160, 480), title="stock tiled round trip", size=(400, 400))
    g.connect(s_dec, 0, plain, "images")
    g.note((40, 640), (
        "Exact round trip of a large image in bounded memory.\n\n"
        "VAE Exact Encode (Tiled) runs every encoder and decoder pass tile by tile and returns the latent whose "
        "decode on that tile grid reproduces the image. VAE Decode (Exact Tiled) decodes on exactly that grid "
        "and blending: give it the same tile_size and overlap. Stock VAE Decode (Tiled) averages three passes "
        "with other tile shapes, so for VAEs whose tiles decode differently from the whole image (GroupNorm, "
        "e.g. TAEF2) it does not give back what was inverted. Below: stock VAE Encode (Tiled) + VAE Decode "
        "(Tiled) for comparison.\n\n"
        "Load: your image in Load Image; a VAE in Load VAE (here sdxl_vae.safetensors from models/vae; any "
        "image VAE, or a video VAE with the frames as the batch). Memory of the VAE passes grows with "
        "tile_size squared."), size=(740, 260))
    g.save("tiled_exact_round_trip.json")


if __name__ == "__main__":
    drift()
    img2img()
    inpaint()
    upscale_refine()
    tiled_round_trip()
