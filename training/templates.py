"""Caption templates for images that only have a class name.

`TEMPLATES` turns a class name into training captions. They vary the viewpoint words ("aerial",
"satellite", "overhead", "bird's-eye"), the sentence shape and the article, because users phrase
searches in all of these ways and a model that saw one fixed sentence learns the sentence rather
than the scene.

`ZERO_SHOT_TEMPLATES` (from `backend.model.prompts`, re-exported here) is a short, plain subset for
zero-shot classification: the text embeddings of a class under each template are averaged (prompt
ensembling, as in CLIP), which is steadier than any single prompt. It stays small so evaluation
stays fast; the backend ensembles search queries and Segment prompts with the same templates.

Every template has exactly one "{}" where the human class name goes (see `fill`).
"""
from __future__ import annotations

from backend.model.prompts import ZERO_SHOT_TEMPLATES, fill

TEMPLATES: tuple[str, ...] = (
    "an aerial photo of {}.",
    "an aerial image of {}.",
    "an aerial view of {}.",
    "an aerial photograph showing {}.",
    "a satellite image of {}.",
    "a satellite photo of {}.",
    "a satellite view showing {}.",
    "a satellite picture of {}.",
    "a remote sensing image of {}.",
    "a high resolution remote sensing image of {}.",
    "a low resolution satellite image of {}.",
    "a remote sensing scene of {}.",
    "an overhead image of {}.",
    "an overhead view of {}.",
    "an overhead shot of {}.",
    "a top-down view of {}.",
    "a top view of {}.",
    "a bird's-eye view of {}.",
    "a bird's eye photo of {}.",
    "an orthophoto of {}.",
    "a nadir image of {}.",
    "a drone photo of {}.",
    "a drone image looking down at {}.",
    "a Google Earth image of {}.",
    "a map tile showing {}.",
    "{} seen from above.",
    "{} seen from the air.",
    "{} seen from space.",
    "{} from a satellite.",
    "{} in an aerial photo.",
    "{} in a satellite image.",
    "{} in a remote sensing image.",
    "an aerial photo of an area with {}.",
    "an aerial photo of a scene with {}.",
    "a satellite image of a place with {}.",
    "this aerial image shows {}.",
    "this satellite image shows {}.",
    "there is {} in this aerial image.",
    "an area of {} seen from above.",
    "a region of {} in a satellite photo.",
    "a scene of {}.",
    "a photo of {}, taken from above.",
    "a clear aerial photo of {}.",
    "a blurry aerial photo of {}.",
    "a bright satellite image of {}.",
    "a dark satellite image of {}.",
    "a cropped aerial image of {}.",
    "a close-up aerial photo of {}.",
    "a wide aerial view of {}.",
    "a remote sensing photo containing {}.",
    "an aerial image where you can see {}.",
    "{}.",
)

__all__ = ["TEMPLATES", "ZERO_SHOT_TEMPLATES", "fill"]
