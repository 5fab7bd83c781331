"""The ADetailer extension's own routes (``/adetailer/v1``), which its API clients read to learn that it is
there and which detection models it offers. underpaint details faces (pipeline/detailer.py): the face
models' names are offered, and every one of them finds faces with the face restorer's RetinaFace."""

from __future__ import annotations

from fastapi import APIRouter

from ...pipeline.detailer import VERSION
from ..security import JSONValueLimitRoute

router = APIRouter(prefix="/adetailer/v1", tags=["adetailer"], route_class=JSONValueLimitRoute)

#: ADetailer's face models' names, as its clients send them ("None" turns a tab off).
FACE_MODELS = ("None", "face_yolov8n.pt", "face_yolov8s.pt", "face_yolov8m.pt", "face_yolov9c.pt",
               "mediapipe_face_full", "mediapipe_face_short", "mediapipe_face_mesh",
               "mediapipe_face_mesh_eyes_only")


@router.get("/version", summary="ADetailer's version (underpaint's face detailing)")
async def version() -> dict[str, str]:
    return {"version": VERSION}


@router.get("/ad_model", summary="The detection models an ADetailer tab may name (all find faces)")
async def ad_model() -> dict[str, list[str]]:
    return {"ad_model": list(FACE_MODELS)}
