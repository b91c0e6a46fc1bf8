"""sdrt.tokenizer.ClipTokenizer against transformers' CLIPTokenizer (what diffusers' pipelines load)."""

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from sdrt.errors import InputError, ModelError
from sdrt.export.clip_vocab import write_clip_tokenizer
from sdrt.tokenizer import ClipTokenizer, TruncationWarning

transformers = pytest.importorskip("transformers")

LONG = ("a highly detailed matte painting of a sprawling cyberpunk city at night, neon signs reflecting in puddles, "
        "flying cars, towering skyscrapers, dense fog, volumetric lighting, cinematic composition, trending on "
        "artstation, by greg rutkowski and alphonse mucha, octane render, unreal engine 5, 8k resolution, sharp focus, "
        "intricate details, vibrant colors, dramatic shadows, award winning photograph, masterpiece")

CORPUS = [
    "a photo of a cat",
    "",
    " ",
    "     ",
    "A Photo Of A CAT",
    "MiXeD CaSe WoRdS",
    "Café crème brûlée",
    "über straße, Grüße aus München",
    "niño jalapeño señor",
    "Cafe\u0301 with a decomposed accent",  # NFC turns e + U+0301 into é
    "東京タワーの夜景",
    "一只可爱的猫",
    "한국어 문장입니다",
    "Кошка сидит на крыше",
    "قطة تجلس على السطح",
    "שלום עולם",
    "Ελληνικά γράμματα",
    "emoji 😀🎉🔥",
    "family 👨‍👩‍👧‍👦 and couple 👩‍❤️‍👨",
    "thumbs 👍🏽 👍🏿 wave 👋🏻",
    "flags 🇯🇵 🇫🇷",
    "numbers 1234567 and 3.14 and -42 and 1,000,000",
    "version v1.5 vs 2.1",
    "wow!!! really??? what?!",
    "hello! world",
    "!!!",
    "a!b!c",
    "...ellipsis… and — dashes – here",
    "don't it's you're we've I'm they'll he'd",
    "DON'T IT'S",
    "rock 'n' roll '90s",
    "tabs\tand\nnewlines\r\nand   multiple    spaces",
    "  leading and trailing spaces  ",
    "fish &amp; chips &lt;tag&gt; &nbsp;",
    "<b>html tags</b>",
    "quotes \"double\" and 'single' and “curly” ‘single’",
    "under_score and hyphen-ated and slash/separated",
    "email@example.com https://example.com/path?q=1",
    "#hashtag @mention $100 50% a+b=c",
    "(masterpiece:1.2), [bad hands], {best quality}",
    "ＦＵＬＬＷＩＤＴＨ １２３",
    "ﬁne ligature",
    "zero\u200bwidth nbsp\u00a0space",
    "<|endoftext|> inside <|startoftext|> text",
    "<|ENDOFTEXT|> uppercase special",
    "İstanbul ǅ Ω",
    LONG,
    "x " * 100,
]
assert len(CORPUS) >= 40


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"sd1": write_clip_tokenizer(root / "sd1"), "sd2": write_clip_tokenizer(root / "sd2", pad_token="!")}


@pytest.fixture(scope="module")
def ours(folders):
    return {k: ClipTokenizer.from_folder(v) for k, v in folders.items()}


@pytest.fixture(scope="module")
def ref(folders):
    return {k: transformers.CLIPTokenizer.from_pretrained(str(v)) for k, v in folders.items()}


def ref_ids(tok, prompts, max_length=77):
    # As diffusers' StableDiffusionPipeline.encode_prompt calls it.
    return np.array(tok(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids, np.int64)


def quiet(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        return tok(prompts)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_corpus_ids_equal_transformers(family, ours, ref):
    got, want = quiet(ours[family], CORPUS), ref_ids(ref[family], CORPUS)
    assert got.dtype == np.int64 and got.shape == (len(CORPUS), 77)
    bad = [(p, got[i][got[i] != want[i]][:5], want[i][got[i] != want[i]][:5]) for i, p in enumerate(CORPUS)
           if not np.array_equal(got[i], want[i])]
    assert not bad, bad


def test_special_ids_and_padding(ours):
    sd1, sd2 = ours["sd1"], ours["sd2"]
    assert (sd1.bos_id, sd1.eos_id, sd1.pad_id, sd1.max_length, sd1.vocab_size) == (49406, 49407, 49407, 77, 49408)
    assert (sd2.bos_id, sd2.eos_id, sd2.pad_id, sd2.max_length, sd2.vocab_size) == (49406, 49407, 0, 77, 49408)
    for tok in (sd1, sd2):
        row = tok(["a photo of a cat"])[0]
        assert list(row[:7]) == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert (row[7:] == tok.pad_id).all()


def test_sd2_pad_token_splits_exclamation_marks(ours, ref):
    # "!" is a special token of SD 2.x tokenizers, matched before BPE: each one is id 0 (as in transformers).
    assert list(ours["sd1"](["wow!!!"])[0][:4]) == [49406, 2781, 995, 49407]  # "!!!</w>"
    assert list(ours["sd2"](["wow!!!"])[0][:6]) == [49406, 2781, 0, 0, 0, 49407]
    np.testing.assert_array_equal(ours["sd2"](["wow!!!"]), ref_ids(ref["sd2"], ["wow!!!"]))


def test_truncation_warning_names_what_was_dropped(ours, ref):
    tok = ours["sd1"]
    content = tok.encode(LONG)
    assert len(content) > 75
    with pytest.warns(TruncationWarning) as record:
        ids = tok(["short", LONG])
    assert len(record) == 1
    message = str(record[0].message)
    dropped = len(content) - 75
    assert f"({dropped} tokens dropped from prompt 1)" in message and "77 tokens" in message
    # The dropped text, decoded as diffusers does: batch_decode(untruncated[:, model_max_length - 1 : -1]).
    untruncated = ref["sd1"]([LONG]).input_ids[0]
    removed = ref["sd1"].decode(untruncated[76:-1])
    assert removed and repr(removed) in message
    assert LONG.endswith(removed.replace(" ,", ","))  # decoding puts a space before each comma
    assert list(ids[1]) == [49406, *content[:75], 49407]


def test_no_warning_at_exactly_75_tokens(ours):
    tok = ours["sd1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)
        row = tok(["a " * 75])[0]
    assert row[-1] == tok.eos_id and (row[1:76] == 320).all()
    with pytest.warns(TruncationWarning, match=r"\(1 tokens dropped from prompt 0\).*'a'"):
        tok(["a " * 76])


def test_added_tokens_match_transformers(folders):
    ours = ClipTokenizer.from_folder(folders["sd2"])
    ref = transformers.CLIPTokenizer.from_pretrained(str(folders["sd2"]))
    new = ["<cat-toy>", "<cat-toy>_1", "<Style>"]
    assert ours.add_tokens(new) == [49408, 49409, 49410]
    assert ref.add_tokens(new) == 3
    assert ours.vocab_size == len(ref) == 49411
    prompts = ["a <cat-toy> <cat-toy>_1 on a mat", "A <CAT-TOY> and <style>!", "<cat-toy><cat-toy>_1", "x<cat-toy>y",
               "cat-toy"]
    got, want = ours(prompts), ref_ids(ref, prompts)
    np.testing.assert_array_equal(got, want)
    assert (got == 49408).any() and (got == 49410).any()


def test_remove_tokens_shifts_later_ids_down(ours, folders):
    tok = ClipTokenizer.from_folder(folders["sd1"])
    tok.add_tokens(["<a>", "<b>", "<c>"])
    assert tok.remove_tokens(["<b>"]) == [49409]
    assert tok.added_tokens == ["<a>", "<c>"] and tok.vocab_size == 49410
    assert list(tok(["<a> <c>"])[0][:4]) == [49406, 49408, 49409, 49407]
    assert tok.remove_tokens(["<a>", "<c>"]) == [49408, 49409]
    assert tok.vocab_size == 49408
    np.testing.assert_array_equal(tok(["<a> <b> <c>"]), ours["sd1"](["<a> <b> <c>"]))


def test_token_errors(folders):
    tok = ClipTokenizer.from_folder(folders["sd1"])
    with pytest.raises(InputError, match="already in the vocabulary"):
        tok.add_tokens(["cat</w>"])
    with pytest.raises(InputError, match="repeat"):
        tok.add_tokens(["<x>", "<x>"])
    with pytest.raises(InputError, match="were not added"):
        tok.remove_tokens(["<never>"])
    with pytest.raises(InputError, match="list of strings"):
        tok("a single string")
    assert tok.vocab_size == 49408


def test_folder_saved_by_transformers(tmp_path, folders):
    # transformers 5 saves tokenizer.json (vocab, merges and the added tokens) and no vocab.json/merges.txt.
    ref = transformers.CLIPTokenizer.from_pretrained(str(folders["sd2"]))
    ref.add_tokens(["<cat-toy>", "<cat-toy>_1"])
    ref.save_pretrained(str(tmp_path))
    assert not (tmp_path / "vocab.json").exists()
    tok = ClipTokenizer.from_folder(tmp_path)
    assert tok.added_tokens == ["<cat-toy>", "<cat-toy>_1"] and tok.pad_id == 0
    prompts = CORPUS[:20] + ["a <cat-toy> <cat-toy>_1 wow!!!"]
    np.testing.assert_array_equal(quiet(tok, prompts), ref_ids(ref, prompts))


def test_model_max_length_from_config(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "short", model_max_length=16)
    tok = ClipTokenizer.from_folder(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert tok.max_length == ref.model_max_length == 16
    prompts = ["a photo of a cat", " ".join(["one two three four five"] * 4)]
    with pytest.warns(TruncationWarning, match="up to 16 tokens"):
        got = tok(prompts)
    np.testing.assert_array_equal(got, ref_ids(ref, prompts, max_length=16))


def test_missing_files(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ModelError, match="vocab.json \\+ merges.txt"):
        ClipTokenizer.from_folder(tmp_path)


def test_runs_without_torch_or_transformers(folders, ref):
    prompts = ["a photo of a cat", "Café 東京 👍🏽 don't!!!", LONG]
    code = textwrap.dedent("""
        import json, sys, warnings
        for name in ("torch", "transformers", "diffusers"):
            sys.modules[name] = None
        from sdrt.tokenizer import ClipTokenizer
        warnings.simplefilter("ignore")
        tok = ClipTokenizer.from_folder(sys.argv[1])
        print(json.dumps(tok(json.loads(sys.argv[2])).tolist()))
    """)
    out = subprocess.run([sys.executable, "-c", code, str(folders["sd2"]), json.dumps(prompts)],
                         capture_output=True, text=True, check=True)
    np.testing.assert_array_equal(np.array(json.loads(out.stdout)), ref_ids(ref["sd2"], prompts))
