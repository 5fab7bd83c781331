"""The ADetailer extension's own routes (``/adetailer/v1``), which its API clients read to learn that it is
there and which detection models it offers (pipeline/detailer.py): the YOLO files in the models folder's
``adetailer/``, then ADetailer's face models' names (RetinaFace finds the faces for those not there)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...pipeline.detailer import yolo_files
from ..security import JSONValueLimitRoute
from ..state import server_state

router = APIRouter(prefix="/adetailer/v1", tags=["adetailer"], route_class=JSONValueLimitRoute)

#: ADetailer's face models' names, as its clients send them ("None" turns a tab off).
FACE_MODELS = ("None", "face_yolov8n.pt", "face_yolov8s.pt", "face_yolov8m.pt", "face_yolov9c.pt",
               "mediapipe_face_full", "mediapipe_face_short", "mediapipe_face_mesh",
               "mediapipe_face_mesh_eyes_only")


#: The ADetailer release whose API the tabs follow (``ad_mask_k`` and ``ad_mask_filter_method``, with the
#: older ``ad_mask_k_largest`` still read): clients compare it to pick the settings' names they send.
API_VERSION = "25.3.0"


@router.get("/version", summary="The ADetailer release whose API underpaint's face detailing follows")
async def version() -> dict[str, str]:
    return {"version": API_VERSION}


@router.get("/ad_model", summary="The detection models an ADetailer tab may name")
def ad_model(request: Request) -> dict[str, list[str]]:
    files = yolo_files(server_state(request).catalog.folder)
    return {"ad_model": list(dict.fromkeys(["None", *files, *FACE_MODELS[1:]]))}
