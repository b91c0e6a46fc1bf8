#!/usr/bin/env bash
# sdrt-host under bad (and some good) command lines: each bad one must exit 1 or 2 with one line on stderr that
# names the problem, never abort or trip a sanitizer.   test_host.sh SDRT_HOST [EXPORT [MORE EXPORTS...]]
# (an SDXL base and refiner among the exports: --refiner runs once on them)
# Exit 0 pass, 1 fail, 77 skip (no export: the cases that load a model did not run), unless SDRT_REQUIRE_FIXTURES.
set -u
HOST=$(realpath "$1")
EXPORT=${2:+$(realpath "$2")}
TMP=$(mktemp -d /tmp/sdrt-host-test-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
# Sanitizer reports get their own exit codes, so they cannot pass for an expected status 1.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}exitcode=86"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}exitcode=87"
fails=0 runs=0

# expect STATUS MESSAGE-PART ARGS...: the exit status, and (for failures) one stderr line containing MESSAGE-PART.
expect() {
  local want=$1 part=$2
  shift 2
  runs=$((runs + 1))
  (cd "$TMP" && "$HOST" "$@") >"$TMP/out" 2>"$TMP/err"
  local got=$? lines
  lines=$(grep -c . "$TMP/err")
  if [ "$got" != "$want" ] || ! grep -qF -- "$part" "$TMP/err" "$TMP/out" || { [ "$want" != 0 ] && [ "$lines" != 1 ]; }; then
    echo "FAIL: sdrt-host $* -> status $got (want $want), stderr ($lines lines):"
    sed 's/^/    /' "$TMP/err" | head -20
    echo "    (wanted \"$part\")"
    fails=$((fails + 1))
  fi
}

# --- the command line alone (no model is loaded) ---
expect 2 "--model is required"
expect 2 "a prompt is required" --model /x
expect 2 "--steps 4294967297 is out of range; use 1-1000" x -m /x --steps 4294967297
expect 2 "--steps 0 is out of range; use 1-1000" x -m /x --steps 0
expect 2 "--mask needs --image" x -m /x --mask m.png
expect 2 "--keep-unmasked applies to inpainting" x -m /x --keep-unmasked
expect 2 "--steps abc is not an integer" x -m /x --steps=abc
expect 2 "--steps 1e3 is not an integer" x -m /x --steps 1e3
expect 2 "--width 4294967360 is out of range; use 1-65536" x -m /x --width 4294967360
expect 2 "-H -64 is out of range" x -m /x -H -64
expect 2 "--seed 18446744073709551616 is out of range" x -m /x --seed 18446744073709551616
expect 2 "--seed -5 is out of range; use 0-18446744073709551615" x -m /x --seed -5
expect 2 "--seed 99999999999999999999999999999999999999999999 is not an integer" x -m /x --seed 99999999999999999999999999999999999999999999
expect 2 "runs past 2^64 - 1 (image k uses seed + k); use at most 18446744073709551614" x -m /x --seed 18446744073709551615 --num-images 2
expect 2 "--num-images 65 is out of range; use 1-64" x -m /x --num-images 65
expect 2 "--batch 0 is out of range" x -m /x --batch 0
expect 2 "--threads -1 is out of range" x -m /x --threads -1
expect 2 "--guidance nan is not a finite number" x -m /x --guidance nan
expect 2 "-g -2 is negative" x -m /x -g -2
expect 2 "--strength 1.5 is outside (0, 1]" x -m /x --strength 1.5
expect 2 "--backend torch is the Python runtime's" x -m /x --backend torch
expect 2 "--backend gpu is not a backend" x -m /x --backend gpu
expect 2 "--ort-provider rocm is not a provider" x -m /x --ort-provider rocm
expect 2 "it cannot go with --backend cpu" x -m /x --ort-provider cuda --backend cpu
expect 2 "--lora :0.5 names no file" x -m /x --lora :0.5
expect 2 "the scale nan is not a finite number" x -m /x --lora a.safetensors:nan
expect 2 "--embedding is not supported" x -m /x --embedding a.pt
expect 2 "--original-size 1024 is not WIDTHxHEIGHT" x -m /x --original-size 1024
expect 2 "--target-size 0x64 is out of range" x -m /x --target-size 0x64
expect 2 "--crop-top-left 4x2 is not TOP,LEFT" x -m /x --crop-top-left 4x2
expect 2 "--aesthetic-score 0 cannot be asked for" x -m /x --aesthetic-score 0
expect 2 "unknown option --bogus" x -m /x --bogus 1
expect 2 "--seed needs a value" x -m /x --seed
expect 2 "a second prompt" x y -m /x
expect 2 "-o is empty" x -m /x -o ""
expect 2 "sdrt-host writes PNG only" x -m /x -o out.jpg
expect 2 "has suffix .gif, not an image type sdrt writes" x -m /x -o out.gif
expect 2 "--max-memory is not supported" x -m /x --max-memory 2G
expect 2 "--refiner-start needs --refiner DIR" x -m /x --refiner-start 0.5
expect 2 "--refiner-start 1.5 is outside (0, 1)" x -m /x --refiner /y --refiner-start 1.5
expect 2 "--refiner-start nan is not a finite number" x -m /x --refiner /y --refiner-start nan
expect 2 "--refiner hands a txt2img run's latents to the refiner; drop --image" x -m /x --refiner /y --image a.png
expect 0 "usage:" --help
# --- files: the init image is read before the model loads ---
expect 1 "--image $TMP is a folder" x -m /x --image "$TMP"
expect 1 "does not exist" x -m /x --image "$TMP/none.png"
printf 'P6\n4 4\n255\n' >"$TMP/short.ppm"
expect 1 "truncated" x -m /x --image "$TMP/short.ppm"
printf 'P6\n1 1\n255' >"$TMP/eof.ppm"
expect 1 "truncated" x -m /x --image "$TMP/eof.ppm"
printf '\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x01\x00\x00\x00\x01\x00\x00\x08\x02\x00\x00\x00\x00\x00\x00\x00' >"$TMP/huge.png"
expect 1 "at most 2^26 pixels" x -m /x --image "$TMP/huge.png"
printf 'GIF89a' >"$TMP/x.gif"
expect 1 "not a PNG or binary PPM" x -m /x --image "$TMP/x.gif"
expect 1 "/nonexistent/model does not exist" x -m /nonexistent/model
expect 1 "no manifest.json" x -m "$TMP"

if [ -z "$EXPORT" ]; then
  echo "test_host: $runs cases, $fails failures (no export: the cases that load a model did not run)"
  [ "$fails" = 0 ] || exit 1
  if [ -n "${SDRT_REQUIRE_FIXTURES:-}" ] && [ "${SDRT_REQUIRE_FIXTURES}" != 0 ]; then
    echo "FAIL: SDRT_REQUIRE_FIXTURES is set but no export was given"
    exit 1
  fi
  exit 77
fi
# --- with a model: the Python CLI's flag spellings, seeds as Python has them, and run-time errors ---
M=(-m "$EXPORT" --steps 2 -q --backend cpu)
expect 0 "out.png  (seed 5)" "a barn" "${M[@]}" --seed 5 -o out.png --no-memory-check
expect 0 "b-2.png  (seed 18446744073709551615: image 2 of the batch from seed 18446744073709551614)" \
  --prompt "a barn" "${M[@]}" --seed 18446744073709551614 --num-images 2 -o b.png
expect 0 "c.1.png  (seed 0)" "a barn" "${M[@]}" --seed=0 -o c.1 --negative-prompt "fog"
expect 0 "d-1.png" "a barn" "${M[@]}" --batch 2 --negative fog -o d --backend onnx --scheduler euler_a -g 1
expect 0 "sdrt.png" "a barn" "${M[@]}" -W 64 -H 64 --backend onnx --ort-provider cpu
expect 0 "new/folder/00001-sdrt.png" "a barn" "${M[@]}" -o new/folder/
expect 0 "new/folder/00003-sdrt.png" "a barn" "${M[@]}" -o new/folder --num-images 2
[ -f "$TMP/b-1.png" ] && [ -f "$TMP/b-2.png" ] && [ -f "$TMP/c.1.png" ] && [ -f "$TMP/sdrt.png" ] && [ -f "$TMP/new/folder/00002-sdrt.png" ] ||
  { echo "FAIL: output files missing"; fails=$((fails + 1)); }
expect 1 "width 65 is not a multiple of" x "${M[@]}" --width 65
expect 1 "unknown scheduler \"nope\"" x "${M[@]}" --scheduler nope
expect 1 "is 64x64 but the output is 128x64" x "${M[@]}" --image "$TMP/sdrt.png" --width 128
expect 1 "is a file, not a folder" x "${M[@]}" -o "$TMP/sdrt.png/x.png"
expect 1 "is a file, not a folder" x -m /x -o "$TMP/sdrt.png/x.png"  # before the model loads
expect 0 "img.png" x "${M[@]}" --image "$TMP/sdrt.png" --strength 0.5 -o img.png
{ printf 'P6\n64 64\n255\n'; head -c $((64 * 64 * 3)) /dev/zero | tr '\0' '\377'; } > "$TMP/white.ppm"
{ printf 'P6\n64 64\n255\n'; head -c $((64 * 64 * 3)) /dev/zero; } > "$TMP/black.ppm"
expect 0 "inp.png" x "${M[@]}" --image "$TMP/sdrt.png" --mask "$TMP/white.ppm" --keep-unmasked --strength 1 -o inp.png
expect 1 "mask_image is all black" x "${M[@]}" --image "$TMP/sdrt.png" --mask "$TMP/black.ppm"
{ printf 'P6\n32 32\n255\n'; head -c $((32 * 32 * 3)) /dev/zero; } > "$TMP/small.ppm"
expect 1 "is 32x32 but --image is 64x64" x "${M[@]}" --image "$TMP/sdrt.png" --mask "$TMP/small.ppm"
expect 1 "--lora-slots" x "${M[@]}" --lora "$TMP/none.safetensors:0.5"  # the first export has no LoRA slots
expect 1 "condition SDXL models only" x "${M[@]}" --original-size 1024x1024  # the first export is SD 1.x
expect 1 "--refiner model folder /nonexistent/refiner does not exist" x "${M[@]}" --refiner /nonexistent/refiner  # before the base runs
expect 1 "hand latents between SDXL base and refiner" x "${M[@]}" --refiner "$EXPORT"
XL="" REFINER=""
for e in "${@:3}"; do
  grep -q '"family": "sdxl"' "$e/manifest.json" 2>/dev/null && XL=$(realpath "$e")
  grep -q '"family": "sdxl_refiner"' "$e/manifest.json" 2>/dev/null && REFINER=$(realpath "$e")
done
if [ -n "$XL" ] && [ -n "$REFINER" ]; then  # base -> refiner (test_pipeline compares its numbers with Python's)
  expect 0 "xl-2.png  (seed 4: image 2 of the batch from seed 3)" "a fox" -m "$XL" --refiner "$REFINER" --refiner-start 0.7 \
    --steps 4 -q --backend cpu --seed 3 --num-images 2 -o xl.png
  expect 1 "denoising_start leaves no step to run; lower it" "a fox" -m "$XL" --refiner "$REFINER" --refiner-start 0.999 \
    --steps 4 -q --backend cpu
fi
echo "test_host: $runs cases, $fails failures"
[ "$fails" = 0 ]
