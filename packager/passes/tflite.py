"""TFLite (LiteRT) passes: validate a .tflite model, and quantize it with ai-edge-quantizer.

Validation walks the flatbuffer (``edge_runtime.tflite_file``) and then loads it in the
interpreter the device will use, so a model that cannot run is refused here, not in the
field. Quantization uses Google's ``ai-edge-quantizer``, the maintained successor of the
TensorFlow converter's post-training options; it runs offline on the .tflite file itself.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from edge_runtime.errors import BackendError, ModelFileError
from edge_runtime.tflite_file import check_tflite

from ..errors import ModelValidationError
from ..formats.tflite import host_session
from .base import (
    ModelArtifact,
    Pass,
    PassConfig,
    PassContext,
    PassFailedError,
    PassOutput,
    RecipeSkippedError,
)

# Precision recorded in the manifest for each quantization mode.
MODE_PRECISION = {"int8-static": "int8", "int8-dynamic": "int8", "fp16": "fp16"}
QUANTIZER_HINT = "pip install 'edgepack[packager]' (it brings ai-edge-quantizer)"


class TfliteValidateConfig(PassConfig):
    pass


class TfliteValidate(Pass):
    """Checks the flatbuffer, loads it in the interpreter and reads its signature."""

    name = "TfliteValidate"
    Config = TfliteValidateConfig
    input_formats = frozenset({"tflite"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        try:
            session = host_session(model.path, 1)
        except (ModelFileError, BackendError) as exc:
            raise ModelValidationError(str(exc)) from None
        facts = session.facts
        inputs, outputs = session.input_specs(), session.output_specs()
        if not inputs or not outputs:
            raise ModelValidationError(f"{model.path.name}: the model has no inputs or outputs")
        metrics = {
            "inputs": inputs,
            "outputs": outputs,
            "signature": session.signature,
            "facts": facts,
            "interpreter": session.info()["interpreter"],
        }
        precision = "int8" if facts.quantized else "fp32"
        if "float16" in facts.weight_types and not facts.quantized:
            precision = "fp16"
        return PassOutput(ModelArtifact(model.path, "tflite", precision), metrics)


class TfliteQuantizeConfig(PassConfig):
    mode: Literal["int8-static", "int8-dynamic", "fp16"] = Field(
        description="int8-static: int8 weights and activations, ranges from calibration "
        "data; int8-dynamic: int8 per-channel weights, activations quantized at run time; "
        "fp16: float16 weights"
    )


class TfliteQuantize(Pass):
    """Post-training quantization of a float .tflite model with ai-edge-quantizer."""

    name = "TfliteQuantize"
    Config = TfliteQuantizeConfig
    input_formats = frozenset({"tflite"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        if model.precision != "fp32":
            # Quantizing quantized weights again only loses accuracy; the chain moves on
            # and, at its end, as-is bundles the model unchanged.
            raise RecipeSkippedError(
                f"the source model is already {model.precision}; the as-is recipe bundles it "
                "unchanged"
            )
        try:
            from ai_edge_quantizer import qtyping, quantizer, recipe
            from ai_edge_quantizer.algorithm_manager import AlgorithmName
        except ImportError as exc:
            raise RecipeSkippedError(
                f"ai-edge-quantizer is not installed ({exc}); {QUANTIZER_HINT}"
            ) from None
        mode = self.config.mode
        engine = quantizer.Quantizer(str(model.path))
        if mode == "int8-dynamic":
            engine.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        elif mode == "int8-static":
            engine.load_quantization_recipe(recipe.static_wi8_ai8())
            # Keep float inputs and outputs (a QUANTIZE/DEQUANTIZE pair at the edges), so
            # callers feed the same arrays as to the float model.
            for edge in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
                engine.update_quantization_recipe(
                    regex=".*", operation_name=edge, algorithm_key=AlgorithmName.NO_QUANTIZE
                )
        else:
            engine.add_weight_only_config(
                regex=".*",
                operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                num_bits=16,
                algorithm_key=AlgorithmName.FLOAT_CASTING,
            )
        with warnings.catch_warnings():
            # The quantizer keeps every intermediate tensor on purpose; the interpreter's
            # warning about that is meant for people who turn it on by hand.
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
            calibration = None
            if engine.need_calibration:
                data = self._calibration_data(model, ctx)
                # Its tqdm bar cannot be turned off and would tear through the build's own
                # progress lines; failures still arrive as exceptions.
                with contextlib.redirect_stderr(io.StringIO()):
                    calibration = engine.calibrate(data)
            result = engine.quantize(
                calibration, enable_progress_bar=False, enable_progress_report=False
            )
        output = out_dir / "model.tflite"
        result.export_model(str(output), overwrite=True)
        check_tflite(output)  # the quantizer's own output must still be a sound model
        return PassOutput(ModelArtifact(output, "tflite", MODE_PRECISION[mode]))

    def _calibration_data(self, model: ModelArtifact, ctx: PassContext) -> dict[str, list]:
        if ctx.calibration is None:
            raise PassFailedError("int8-static needs --calibration FILE.npz")
        # The first signature, as the session that evaluates the model picks it.
        signatures = check_tflite(model.path).signatures
        if not signatures:
            raise PassFailedError("int8-static needs a model with a signature (serving_default)")
        # Batch-1 models take one sample per call; ai-edge-quantizer runs them in turn.
        # Every --calibration file, fed as the model is (batch axes, constants, state).
        return {signatures[0]: ctx.calibration_feeds()}
