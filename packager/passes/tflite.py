"""TFLite (LiteRT) passes: validate a .tflite model, normalize it, and quantize it with
ai-edge-quantizer.

Validation walks the flatbuffer (``edge_runtime.tflite_file``) and then loads it in the
interpreter the device will use, so a model that cannot run is refused here, not in the
field. Normalization gives a signature-less model its ``serving_default`` signature and
moves old-style operator codes where the quantizer reads them (``packager.tflite_rewrite``).
An fp16-weight model is folded back to float32 before an int8 recipe. Quantization uses
Google's ``ai-edge-quantizer``, the maintained successor of the TensorFlow converter's
post-training options; it runs offline on the .tflite file itself.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from edge_runtime.cpus import usable_cpus
from edge_runtime.errors import BackendError, ModelFileError
from edge_runtime.tflite_file import check_tflite

from .. import tflite_rewrite
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
from .evaluate import reference_outputs, run_dataset
from .onnx_opset import output_drift

# Precision recorded in the manifest for each quantization mode.
MODE_PRECISION = {"int8-static": "int8", "int8-dynamic": "int8", "fp16": "fp16"}
# Weight tensor types that show a precision is in the file.
PRECISION_WEIGHT_TYPES = {"int8": ("int8", "uint8", "int4"), "fp16": ("float16",)}
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


class TfliteNormalizeConfig(PassConfig):
    pass


class TfliteNormalize(Pass):
    """Adds a ``serving_default`` signature to a model without one (keyed by its tensor
    names, the names the interpreter already gives), and writes operator codes older
    converters left in the deprecated field where ai-edge-quantizer reads them.

    Neither changes what the model computes; a model that needs neither is left as it is
    (and the step leaves no record).
    """

    name = "TfliteNormalize"
    Config = TfliteNormalizeConfig
    input_formats = frozenset({"tflite"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        try:
            from ai_edge_litert.tools import flatbuffer_utils  # noqa: F401
        except ImportError:
            # Only the rewrite needs it; the interpreter runs the model as it is, and the
            # quantizing recipes say ai-edge-quantizer (which brings it) is missing.
            return PassOutput(model)
        output = out_dir / "model.tflite"
        done = tflite_rewrite.normalize(model.path, output)
        if not done.changed:
            return PassOutput(model)
        try:
            session = host_session(output, 1)
        except (ModelFileError, BackendError) as exc:
            raise PassFailedError(f"the rewritten model does not load: {exc}") from None
        metrics = {
            "inputs": session.input_specs(),
            "outputs": session.output_specs(),
            "signature": session.signature,
            "facts": session.facts,
            "builtin_codes_filled": done.builtin_codes,
        }
        if done.signature:
            metrics["signature_added"] = done.signature
            ctx.progress(
                f"normalize: no signature; added {tflite_rewrite.SIGNATURE_KEY} (inputs "
                f"{', '.join(done.signature['inputs'])}; outputs "
                f"{', '.join(done.signature['outputs'])})"
            )
        if done.builtin_codes:
            ctx.progress(
                f"normalize: {done.builtin_codes} operator codes moved out of the deprecated "
                "field, where ai-edge-quantizer reads them"
            )
        return PassOutput(ModelArtifact(output, "tflite", model.precision), metrics)


class TfliteDequantizeFp16Config(PassConfig):
    rtol: float = Field(
        1e-4,
        gt=0,
        description="largest difference allowed between the float32 and the float16-weight "
        "model's outputs, relative to the largest value of that output",
    )


class TfliteDequantizeFp16(Pass):
    """Folds each DEQUANTIZE of a float16 constant into the float32 constant it computes,
    so an int8 recipe starts from float32 weights; checked against the source's outputs.

    A model without such weights is left as it is (and the step leaves no record).
    """

    name = "TfliteDequantizeFp16"
    Config = TfliteDequantizeFp16Config
    input_formats = frozenset({"tflite"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        if model.precision != "fp16":
            return PassOutput(model)
        try:
            from ai_edge_litert.tools import flatbuffer_utils  # noqa: F401
        except ImportError as exc:
            raise RecipeSkippedError(
                f"the source model has float16 weights, and folding them into float32 needs "
                f"ai-edge-litert ({exc}); {QUANTIZER_HINT}"
            ) from None
        output = out_dir / "model.tflite"
        done = tflite_rewrite.dequantize_fp16(model.path, output)
        if not done.changed:
            return PassOutput(model)  # float16 weights, but not behind DEQUANTIZE operators
        dataset = ctx.eval_sets[0]
        drifted = output_drift(
            run_dataset(output, dataset), reference_outputs(ctx, dataset), self.config.rtol
        )
        if drifted:
            raise PassFailedError(
                "folding the float16 weights into float32 changed what the model computes on "
                f"the eval data: {'; '.join(drifted)}"
            )
        ctx.progress(
            f"dequantize: {len(done.folded)} float16 weights folded into float32; the outputs "
            f"match the source's on {dataset.samples} eval samples"
        )
        return PassOutput(ModelArtifact(output, "tflite", "fp32"), {"folded": len(done.folded)})


class TfliteFuseActivationsConfig(PassConfig):
    pass


class TfliteFuseActivations(Pass):
    """Folds each standalone RELU into the ADD or convolution before it (its fused
    activation), before static int8 quantization.

    The float arithmetic is the same. In int8, XNNPACK takes no standalone RELU, so each
    one split the graph into another delegate partition with a reference kernel between:
    MediaPipe's BlazeFace detector (17 RELUs after ADDs) ran in 18 partitions at 14 ms,
    fused in one at 4 ms. The fused output range also starts at 0, which gives the int8
    activations twice the resolution. A model without such RELUs is left as it is.
    """

    name = "TfliteFuseActivations"
    Config = TfliteFuseActivationsConfig
    input_formats = frozenset({"tflite"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        if model.precision != "fp32":
            return PassOutput(model)  # TfliteQuantize says why it skips this model
        try:
            from ai_edge_litert.tools import flatbuffer_utils  # noqa: F401
        except ImportError:
            return PassOutput(model)  # TfliteQuantize says ai-edge-quantizer is missing
        output = out_dir / "model.tflite"
        done = tflite_rewrite.fuse_activations(model.path, output)
        if not done.changed:
            return PassOutput(model)
        ctx.progress(f"fuse: {done.fused} RELU operators folded into the operator before them")
        return PassOutput(ModelArtifact(output, "tflite", model.precision), {"fused": done.fused})


class TfliteQuantizeConfig(PassConfig):
    mode: Literal["int8-static", "int8-dynamic", "fp16"] = Field(
        description="int8-static: int8 weights and activations, ranges from calibration "
        "data; int8-dynamic: int8 per-channel weights, activations quantized at run time; "
        "fp16: float16 weights"
    )
    calibration: Literal["min-max", "moving-average"] = Field(
        "min-max",
        description="int8-static: how activation ranges are taken from the calibration "
        "samples. min-max: the smallest and largest value over all samples; moving-average: "
        "ai-edge-quantizer's default, an exponential average (0.95) of each sample's range, "
        "which with a few dozen samples stays near the first ones and clips the rest",
    )


class TfliteQuantize(Pass):
    """Post-training quantization of a float .tflite model with ai-edge-quantizer."""

    name = "TfliteQuantize"
    Config = TfliteQuantizeConfig
    input_formats = frozenset({"tflite"})

    def _run(self, model: ModelArtifact, out_dir: Path, ctx: PassContext) -> PassOutput:
        if model.precision != "fp32":
            # Quantizing quantized weights again only loses accuracy; the chain moves on
            # and, at its end, as-is bundles the model unchanged. (An int8 recipe folds
            # float16 weights back to float32 first: TfliteDequantizeFp16.)
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
                    calibration = self._calibrate(engine, model.path, data)
            # Its "Applying Transformations" bar ignores enable_progress_bar; as above.
            with contextlib.redirect_stderr(io.StringIO()):
                result = engine.quantize(
                    calibration, enable_progress_bar=False, enable_progress_report=False
                )
        output = out_dir / "model.tflite"
        result.export_model(str(output), overwrite=True)
        facts = check_tflite(output)  # the quantizer's own output must still be a sound model
        precision = MODE_PRECISION[mode]
        if not any(facts.weight_types.get(t) for t in PRECISION_WEIGHT_TYPES[precision]):
            # The engine would refuse it too ("nothing was quantized"); here the reason can
            # name the operators the quantizer left alone.
            raise PassFailedError(
                f"nothing was quantized: ai-edge-quantizer's {mode} recipe left every weight "
                f"in float32; the model's weighted operators are "
                f"{tflite_rewrite.describe_weighted_operators(model.path)}"
            )
        return PassOutput(ModelArtifact(output, "tflite", precision))

    def _calibrate(self, engine, path: Path, data: dict[str, list]) -> dict:
        """Activation ranges over the calibration samples, as the config says."""
        if self.config.calibration == "moving-average":
            return engine.calibrate(data, num_threads=usable_cpus().count)
        from ai_edge_quantizer import calibrator
        from ai_edge_quantizer.utils import qsv_utils

        # Quantizer.calibrate has no way to pass the update rule, so the calibrator runs
        # here with the quantizer's recipe (a private attribute in 0.10, which is pinned).
        # Measured on MediaPipe's face landmark model with 16 samples: moving-average
        # clipped the face-flag logit at 26 (the float model reaches 52) and moved the
        # landmarks by up to 2.6 px per face on average; min-max: 1.4 px, no clipping.
        engine_calibrator = calibrator.Calibrator(
            str(path), num_threads=usable_cpus().count, qsv_update_func=qsv_utils.min_max_update
        )
        engine_calibrator.calibrate(data, engine._recipe_manager)
        return engine_calibrator.get_model_qsvs()

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
