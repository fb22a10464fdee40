"""`orestudy serve`: a small local web page to ask a model about photos.

FastAPI (already installed with MLflow) and one hand-written HTML page: a user drops one or more photos
and sees, per photo, the answer ("not one of these", "unknown" or a class, at the target error the
server was started with), the top classes with their probabilities, the prediction set, the three
nearest training photos with their labels, the Grad-CAM heat map over the photo, and the model card's
key figures. Gradio would do the same in ten times the dependencies.

Safety: it binds to 127.0.0.1 unless told otherwise; an upload is read into memory (never written to
disk), refused past --max-upload-mb or when it is not a JPEG, PNG, WebP, GIF, BMP or TIFF image; a
photo's pixel count is capped by PIL's decompression-bomb limit; reference photos are served only from
the bank's own list (by index), under the data root, and only when their content hash matches.
"""
from __future__ import annotations

import base64
import html
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import Request  # at module level: the route's annotation is resolved from here
from PIL import Image

from . import answering, evidence, prediction

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}  # MPO: a phone's JPEG with a depth image
ALLOWED_TYPES = {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff",
                 "application/octet-stream"}
DEFAULT_MAX_MB = 10.0


@dataclass
class Settings:
    source: str
    data_root: str | None = None       # where the reference (training) photos are; None: the model's data
    target_error: float = answering.DEFAULT_TARGET_ERROR
    delta: float = answering.DEFAULT_DELTA
    coverage: float = answering.DEFAULT_COVERAGE
    guarantee: str = answering.DEFAULT_GUARANTEE
    max_upload_mb: float = DEFAULT_MAX_MB
    threads: int = 0


class Asker:
    """The model and its rules, loaded once; ask(bytes) answers one photo as a JSON-able dict."""

    def __init__(self, settings: Settings):
        from .. import device as devices

        devices.set_threads(settings.threads)
        self.settings = settings
        if prediction.exported_description(settings.source):  # no gradients: answers without heat maps
            self.eager, (self.model, self.meta) = None, prediction.load_exported(settings.source)
        else:
            self.eager, self.meta = prediction.load_eager(settings.source)
        self.tta = bool(self.meta["best"].get("tta", False))  # an exported file has its flips inside
        self.rules = answering.rules_for(self.meta, settings.source, settings.target_error, settings.delta,
                                         settings.coverage, settings.guarantee)
        if self.eager is not None:
            self.model = prediction.ready(self.eager, self.meta, torch.device("cpu"), None,
                                          self.rules.novelty is not None, self.tta)
        root = settings.data_root or self.meta.get("config", {}).get("data")
        self.data_root = Path(root) if root and Path(root).is_dir() else Path(data_root_default())
        self.lock = threading.Lock()  # one forward pass at a time: torch already uses every core
        self.card = card_figures(settings.source, self.meta, self.rules)

    def ask(self, content: bytes, name: str) -> dict:
        """The page's answer for one photo's bytes (checked by check_upload first)."""
        size = self.meta["input_size"]
        with self.lock:
            (pred,) = list(prediction.predict(self.model, self.meta, [io.BytesIO(content)], self.rules.threshold,
                                              3, self.tta, 1, quantile=self.rules.quantile, novelty=self.rules.novelty))
            if pred.error:
                return {"name": name, "error": pred.error}
            heat = None
            if self.eager is not None:
                image = evidence.eval_image(io.BytesIO(content), size)
                heat = evidence.heat_map_png(self.eager, self.meta, image, self.meta["class_names"].index(pred.top[0][0]))
        names = self.meta["class_names"]
        if pred.novel:
            verdict = f"Not one of the {len(names)} minerals this model knows"
        elif pred.answer == prediction.UNKNOWN:
            verdict = "Unknown: not sure enough to name it at this target error"
        else:
            verdict = pred.answer
        return {"name": name, "answer": pred.answer, "verdict": verdict, "why": self.why(pred), "novel": pred.novel,
                "novelty": None if np.isnan(pred.novelty) else round(pred.novelty, 4),
                "novelty_threshold": (None if self.rules.novelty is None or np.isinf(self.rules.novelty.threshold)
                                      else round(self.rules.novelty.threshold, 4)),
                "confidence": round(pred.confidence, 4), "top": [[c, round(p, 4)] for c, p in pred.top],
                "set": pred.set, "heatmap": heat and "data:image/png;base64," + base64.b64encode(heat).decode(),
                "heatmap_class": pred.top[0][0],
                "similar": [{**s, "distance": round(s["distance"], 4)} for s in pred.similar]}

    def why(self, pred: prediction.Prediction) -> str:
        """One line under the verdict: the rule that gave it."""
        rules, c = self.rules, self.rules.certificate
        if pred.novel:
            return ""
        if c is None:
            return "this model keeps no 'unknown' threshold: every photo is named"
        target = f"{answering.pct(rules.target_error)} error (confidence {1 - rules.delta:g})"
        if not c.certified:
            smallest = "none up to 50 %" if c.smallest is None else answering.pct(c.smallest)
            return (f"nothing can be certified at {target}: the smallest target this model can certify is {smallest}, "
                    f"limited by its {c.limit}")
        if pred.answer == prediction.UNKNOWN:
            return (f"top probability {pred.confidence:.3f} is under {c.threshold:.3f}, the threshold that keeps "
                    f"answers within {target}")
        return f"top probability {pred.confidence:.3f} ≥ {c.threshold:.3f}: answers like this are within {target}"

    def reference(self, index: int) -> bytes | None:
        """A JPEG thumbnail of the bank's photo index, if it is under the data root with the same content."""
        scorer = self.rules.novelty
        if scorer is None or not 0 <= index < len(scorer.photos):
            return None
        path = (self.data_root / scorer.photos[index]).resolve()
        if not path.is_relative_to(self.data_root.resolve()) or not path.is_file():
            return None
        import hashlib

        if hashlib.sha256(path.read_bytes()).hexdigest() != scorer.hashes[index]:
            return None
        return evidence.thumbnail(path)


def data_root_default() -> str:
    from ..config import default_data_root

    return str(default_data_root())


def card_figures(source: str, meta: dict, rules: answering.Rules) -> dict:
    """The model card's key figures: card.json beside the checkpoint (the ready model's), else what the
    checkpoint itself says."""
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    card = json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
    config = meta.get("config", {})
    return {"name": card.get("name", folder.name), "classes": meta["class_names"],
            "recipe": card.get("recipe", f"{meta.get('backbone')} {config.get('regime', '')} "
                                         f"attention {config.get('attention', '')}, seed {config.get('seed', '')}"),
            "figures": card.get("figures", []), "confusions": card.get("confusions", []),
            "note": card.get("note", "").split(". ")[0],
            "rules": rules.notes, "card": card.get("card_url", "")}


def check_upload(content: bytes, content_type: str, max_bytes: int) -> str:
    """'' when the upload may be decoded, else why not (a size, a type)."""
    if len(content) > max_bytes:
        return f"the photo is {len(content) / 1e6:.1f} MB; this page takes at most {max_bytes / 1e6:.0f} MB"
    if content_type.split(";")[0].strip().lower() not in ALLOWED_TYPES:
        return f"not an image type this page takes ({content_type}): JPEG, PNG, WebP, GIF, BMP or TIFF"
    try:
        with Image.open(io.BytesIO(content)) as probe:
            fmt = probe.format
    except Exception as err:  # PIL raises many types for what is not an image
        return f"not a readable image ({type(err).__name__})"
    if fmt not in ALLOWED_FORMATS:
        return f"{fmt} images are not taken: JPEG, PNG, WebP, GIF, BMP or TIFF"
    return ""


def make_app(settings: Settings):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    asker = Asker(settings)
    max_bytes = int(settings.max_upload_mb * 1e6)
    app = FastAPI(title="orestudy", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.asker = asker

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.replace("__TITLE__", html.escape(asker.card["name"])).replace("__MAX_MB__", f"{settings.max_upload_mb:g}")

    @app.get("/api/card")
    def card():
        return asker.card

    @app.post("/api/predict")
    async def predict(request: Request, name: str = "photo"):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return JSONResponse({"name": name, "error": f"the photo is {int(declared) / 1e6:.1f} MB; this page "
                                                        f"takes at most {max_bytes / 1e6:.0f} MB"}, 413)
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a missing or false length changes nothing
            body += chunk
            if len(body) > max_bytes:
                return JSONResponse({"name": name, "error": f"the photo is over {max_bytes / 1e6:.0f} MB, the most "
                                                            f"this page takes"}, 413)
        problem = check_upload(bytes(body), request.headers.get("content-type", ""), max_bytes)
        if problem:
            return JSONResponse({"name": name, "error": problem}, 415)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(asker.ask, bytes(body), name[:200])

    @app.get("/api/reference/{index}")
    def reference(index: int):
        thumb = asker.reference(index)
        if thumb is None:
            raise HTTPException(404, "no such reference photo here")
        return Response(thumb, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = make_app(settings)
    print(f"orestudy serve: {settings.source} on http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    for line in app.state.asker.rules.notes:
        print(line, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>orestudy: __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f6f5f2;color:#222}
header{background:#3b4a3f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;font-size:13px;opacity:.85}
main{padding:16px 24px;max-width:1200px}
#drop{border:2px dashed #8a9a8d;border-radius:10px;padding:22px;text-align:center;background:#fff;cursor:pointer}
#drop.over{background:#e8f0e9}
#card{font-size:13px;background:#fff;border-radius:8px;padding:10px 14px;margin:12px 0}
#card ul{margin:4px 0;padding-left:18px}
.photo{display:grid;grid-template-columns:240px 240px 1fr;gap:16px;background:#fff;border-radius:10px;
 padding:14px;margin:14px 0;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.photo img.main{width:240px;height:240px;object-fit:cover;border-radius:6px}
.verdict{font-size:22px;font-weight:600;margin:0 0 6px}
.verdict.novel{color:#a33}.verdict.unknown{color:#946200}.verdict.named{color:#1d6b32}
table{border-collapse:collapse;font-size:14px}td{padding:2px 10px 2px 0}
.bar{background:#7aa883;height:10px;border-radius:3px}
.similar{display:flex;gap:8px;margin-top:6px}.similar figure{margin:0;font-size:12px;text-align:center}
.similar img{width:90px;height:90px;object-fit:cover;border-radius:4px;background:#ddd}
.error{color:#a33;font-weight:600}.small{font-size:12px;color:#555}
</style></head><body>
<header><h1>What mineral is this? <span id="model"></span></h1>
<p>Drop photos of hand specimens. Every answer comes with its top classes, a prediction set, the nearest
training photos and where the model looked.</p></header>
<main>
<div id="drop">Drop photos here, or <label><u>choose files</u><input id="files" type="file" multiple
 accept="image/jpeg,image/png,image/webp,image/gif,image/bmp,image/tiff" hidden></label>
 <div class="small">JPEG, PNG, WebP, GIF, BMP or TIFF, at most __MAX_MB__ MB each. Photos stay in this computer's
 memory while they are answered and are never saved.</div></div>
<div id="card"></div>
<div id="results"></div>
</main>
<script>
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
fetch('/api/card').then(r => r.json()).then(c => {
  document.getElementById('model').textContent = '(' + c.name + ')';
  document.getElementById('card').innerHTML = '<b>Model:</b> ' + esc(c.recipe) + ' &middot; knows ' +
    c.classes.length + ' minerals: ' + c.classes.map(esc).join(', ') +
    (c.note ? '<div class="small"><b>' + esc(c.note) + '</b> (see the model card)</div>' : '') +
    '<ul>' + c.figures.map(f => '<li>' + esc(f) + '</li>').join('') + '</ul>' +
    (c.confusions.length ? '<b>Known confusions:</b> ' + c.confusions.map(esc).join('; ') : '') +
    '<ul class="small">' + c.rules.map(r => '<li>' + esc(r) + '</li>').join('') + '</ul>';
});
async function ask(file) {
  const box = document.createElement('div'); box.className = 'photo'; box.dataset.name = file.name;
  const url = URL.createObjectURL(file);
  box.innerHTML = '<div><img class="main" src="' + url + '" alt="the photo"><div class="small">' + esc(file.name) +
    '</div></div><div class="heat small">answering&hellip;</div><div class="answer"></div>';
  document.getElementById('results').prepend(box);
  let out;
  try {
    const r = await fetch('/api/predict?name=' + encodeURIComponent(file.name),
      {method: 'POST', body: file, headers: {'Content-Type': file.type || 'application/octet-stream'}});
    out = await r.json();
  } catch (e) { out = {error: 'the server did not answer (' + e + ')'}; }
  const answer = box.querySelector('.answer'), heat = box.querySelector('.heat');
  if (out.error) { heat.textContent = ''; answer.innerHTML = '<p class="error">' + esc(out.error) + '</p>'; box.dataset.done = 'error'; return; }
  const kind = out.novel ? 'novel' : (out.answer === 'unknown' ? 'unknown' : 'named');
  heat.innerHTML = out.heatmap ? '<img class="main" src="' + out.heatmap + '" alt="heat map"><div class="small">where the model looked for ' +
    esc(out.heatmap_class) + ' (Grad-CAM)</div>' : '<div class="small">no heat map: an exported model keeps no gradients</div>';
  answer.innerHTML = '<p class="verdict ' + kind + '" data-answer="' + esc(out.answer) + '">' + esc(out.verdict) + '</p>' +
    (out.why ? '<p class="small why">' + esc(out.why) + '</p>' : '') +
    (out.novel ? '<p class="small">Farther from every training photo (' + out.novelty + ') than 95 % of photos of the known minerals (' +
       out.novelty_threshold + '). If it were one of them:</p>' : '') +
    '<table>' + out.top.map(([c, p]) => '<tr><td>' + esc(c) + '</td><td>' + (100 * p).toFixed(1) +
      ' %</td><td><div class="bar" style="width:' + Math.round(160 * p) + 'px"></div></td></tr>').join('') + '</table>' +
    '<p><b>Prediction set:</b> <span class="set">' + out.set.map(esc).join(' or ') + '</span></p>' +
    (out.similar.length ? '<b>Nearest training photos</b><div class="similar">' + out.similar.map(s =>
      '<figure><img src="/api/reference/' + s.index + '" alt="' + esc(s.label) + '" onerror="this.style.visibility=\\'hidden\\'"><figcaption>' +
      esc(s.label) + '<br>' + s.distance.toFixed(3) + '</figcaption></figure>').join('') + '</div>' : '');
  box.dataset.done = kind;
}
function askAll(files) { [...files].forEach(ask); }
const drop = document.getElementById('drop'), input = document.getElementById('files');
input.addEventListener('change', () => askAll(input.files));
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); askAll(e.dataTransfer.files); });
</script></body></html>
"""
