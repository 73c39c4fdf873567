"""Training presets (training/presets/*.json): what the train form and clients may name, so no
client keeps its own copy of the list."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ReadAccess
from app.api.schemas import PresetOut

router = APIRouter(prefix="/presets", tags=["jobs"])


@router.get("", response_model=list[PresetOut], dependencies=[ReadAccess])
def list_presets() -> list[PresetOut]:
    """Every preset with its method and what it is for; the recommended ones (the best method
    measured on each benchmark, and the one for any other data) first."""
    from training.config import GENERAL_PRESET, RECOMMENDED_PRESETS, list_presets, preset_summary

    recommended = [*RECOMMENDED_PRESETS.values(), GENERAL_PRESET]
    names = recommended + [name for name in list_presets() if name not in recommended]
    return [
        PresetOut(name=name, recommended=name in recommended, **preset_summary(name))
        for name in names
    ]
