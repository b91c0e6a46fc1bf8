"""Every request and response on the wire, in one module (pydantic): AUTOMATIC1111's API, OpenAI's images API,
sdrt's async jobs, and the error body all routes share.

Static bounds live here (they appear in the OpenAPI schema); the server's configurable limits (pixels, steps,
images per request, prompt length) are checked by `sdrt.serve.limits.Limits` and answer 422 the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1  # A1111's seeds are 32-bit; -1 means random


# --- errors: one body for every 4xx/5xx ---------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as JSON with `status` (no traceback text ever reaches a response)."""

    def __init__(self, status: int, message: str, loc: tuple | None = None, headers: dict | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.loc, self.headers, self.kind = status, message, loc, headers, kind


class FieldError(ApiError):
    """A request field out of range: 422 naming the field and what is allowed."""

    def __init__(self, field: str | tuple, message: str):
        super().__init__(422, message, ("body", field) if isinstance(field, str) else tuple(field))


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """FastAPI's `detail` list (A1111 clients read it) and OpenAI's `error` object (the openai client reads it)."""

    detail: list[ErrorItem]
    error: OpenAIErrorInfo


# --- AUTOMATIC1111 (/sdapi/v1) ----------------------------------------------------------------------------------


class A1111Base(BaseModel):
    """The fields of A1111's StableDiffusionProcessing*API that sdrt acts on; the rest (hires fix, face restoration,
    scripts, ...) are accepted and ignored, as clients such as webuiapi always send them."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random")
    sampler_name: str | None = Field(None, description="e.g. 'Euler a', 'DDIM', 'DPM++ 2M Karras' (GET /sdapi/v1/samplers)")
    sampler_index: str | None = Field(None, description="deprecated alias of sampler_name")
    scheduler: str | None = Field(None, description="'Automatic', or 'Karras' with a DPM++ sampler")
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=64)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    width: int = Field(512, ge=1, le=16384)
    height: int = Field(512, ge=1, le=16384)
    override_settings: dict[str, Any] | None = Field(None, description="only sd_model_checkpoint is read")
    send_images: bool = True
    save_images: bool = False


class Txt2ImgRequest(A1111Base):
    enable_hr: bool = Field(False, description="hires fix: not supported (must be false)")


class Img2ImgRequest(A1111Base):
    init_images: list[str] = Field(..., min_length=1, max_length=1, description="one base64 PNG/JPEG (a data: URL is fine)")
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)
    mask: str | None = Field(None, description="inpainting: base64 mask, white = repaint (sdrt.serve.a1111_inpaint)")
    mask_blur: int = Field(4, ge=0, le=256, description="pixels of Gaussian blur on the mask (soft edge)")
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="'Only masked': inpaint a crop around the mask at width x height")
    inpaint_full_res_padding: int = Field(0, ge=0, le=4096, description="pixels added around the mask's crop")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1: repaint the black of the mask")
    include_init_images: bool = False


class A1111ImagesResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each carrying its A1111 `parameters` text chunk")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string: prompt, all_seeds, infotexts, ...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class OptionsResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: str
    samples_format: str = "png"


class OptionsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    sd_model_checkpoint: str | None = Field(None, description="a model served here (GET /sdapi/v1/sd-models)")


class LoraItem(BaseModel):
    name: str = Field(description="the file's stem: use it as <lora:NAME:SCALE> in the prompt")
    alias: str = Field(description="the metadata's ss_output_name, else the name; prompts may use it too")
    path: str = Field(description="the file inside the server's --lora-dir")
    metadata: dict[str, Any]


class ScriptsResponse(BaseModel):
    txt2img: list[str] = []
    img2img: list[str] = []


# --- OpenAI images (/v1/images) ---------------------------------------------------------------------------------


class SdrtExtras(BaseModel):
    """sdrt's knobs, sent as extra body fields (the openai client's `extra_body`)."""

    negative_prompt: str | None = None
    steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    scheduler: str | None = Field(None, description="an sdrt name (ddim, euler_a, dpmpp_2m_karras, ...) or A1111 sampler name")
    loras: dict[str, float] | None = Field(None, description="run-time LoRAs {name: scale}, names from GET /sdapi/v1/loras "
                                                             "(the server's --lora-dir); requests batch with the same set only")
    timestep_spacing: Literal["leading", "linspace", "trailing"] | None = Field(
        None, description="instead of the model's scheduler config's; 'trailing' for few-step models (SD-Turbo, LCM)")


class ImageGenerationRequest(SdrtExtras):
    model_config = ConfigDict(extra="ignore")  # quality, style, user, moderation, ... have no meaning here

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    size: str | None = Field(None, description="'WxH' (e.g. '64x64') or 'auto'")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="only b64_json is served")
    output_format: Literal["png"] | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


# --- async jobs (/v1/jobs) --------------------------------------------------------------------------------------


class JobRequest(SdrtExtras):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    width: int | None = Field(None, ge=1, le=16384)
    height: int | None = Field(None, ge=1, le=16384)
    init_image: str | None = Field(None, description="base64 PNG/JPEG for img2img")
    strength: float = Field(0.8, gt=0.0, le=1.0)
    mask: str | None = Field(None, description="base64 PNG inpainting mask for init_image: white = repaint (sdrt.inpaint)")
    mask_blur: int = Field(0, ge=0, le=256, description="pixels of Gaussian blur on the mask (soft paste-back edge)")
    keep_unmasked: bool = Field(False, description="paste the result back: pixels outside the mask keep their values")
    preview_every: int = Field(0, ge=0, le=1000, description="send a preview event every N steps (0: server default)")
    preview_decode: bool = Field(False, description="previews by the VAE decoder (exact, slower) instead of the linear projection")


JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class JobStatus(BaseModel):
    id: str
    model: str
    status: JobState
    position: int | None = Field(None, description="requests ahead of this one (queued only)")
    step: int = 0
    total: int = 0
    images: list[str] | None = Field(None, description="base64 PNGs (done only)")
    seeds: list[int] | None = None
    parameters: list[dict[str, Any]] | None = None
    batch_images: int | None = Field(None, description="images in the UNet batch this job ran in")
    error: str | None = None
    created: float


# --- operations -------------------------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str
    models: dict[str, str]
