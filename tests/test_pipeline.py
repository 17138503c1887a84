"""pipeline('ofa-ufo'): registration in a fresh process, task outputs, batching through transformers'
loop (lists, generators, datasets, workers), dtype and device, bad input and bad settings."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList, pipeline
from transformers.pipelines.pt_utils import KeyDataset

import ofa_ufo
from ofa_ufo import ImageLoadError
from ofa_ufo.generation.constraints import BanTokenRangeLogitsProcessor, BoxSequenceLogitsProcessor, end_banned
from ofa_ufo.generation.settings import check_generation_settings
from ofa_ufo.tasks import FREE_PROMPT, get_task


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return pipeline("ofa-ufo", model=str(tiny_checkpoint))


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 70 - 5 * i, 3), dtype=np.uint8)) for i in range(4)]


def test_pipeline_after_import_in_fresh_process(pipe, tiny_checkpoint, tmp_path):
    image_path = tmp_path / "photo.png"
    Image.new("RGB", (50, 30), (200, 10, 10)).save(image_path)
    code = (
        "import json, ofa_ufo\n"
        "from transformers import pipeline\n"
        f"pipe = pipeline('ofa-ufo', model={str(tiny_checkpoint)!r})\n"
        f"print(json.dumps(pipe({str(image_path)!r}, task='caption', max_new_tokens=4)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    here = pipe(str(image_path), task="caption", max_new_tokens=4)  # registered and loaded the same way
    assert set(answer) == {"text", "score"} and answer["text"] == here["text"]
    assert answer["score"] == pytest.approx(here["score"], rel=1e-4)


# ---- answers against model.generate with the task's settings (prompts as in prompts/ofa.json) ---

START, EOS = 0, 2


def _model_inputs(processor, image, prompt: str) -> dict[str, torch.Tensor]:
    inputs = processor(images=None if image is None else [image], text=[prompt], return_tensors="pt")
    keys = ("input_ids", "attention_mask") if image is None else ("input_ids", "attention_mask", "pixel_values",
                                                                  "image_mask")
    return {key: inputs[key] for key in keys}


def _answer(model, inputs: dict[str, torch.Tensor], processors: list, **settings) -> tuple[list[int], float]:
    """(answer tokens after <s>, </s> excluded; probability of the answer and its </s>, teacher forced over
    the whole vocabulary) of `model.generate`'s best sequence."""
    with torch.no_grad():
        sequence = model.generate(**inputs, logits_processor=LogitsProcessorList(processors), **settings)[0].tolist()
        tokens = sequence[1:sequence.index(EOS) + 1] if EOS in sequence else sequence[1:]
        logits = model(**inputs, decoder_input_ids=torch.tensor([[START, *tokens[:-1]]])).logits[0]  # (T, V)
    logp = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).sum()
    return [t for t in tokens if t != EOS], float(logp.exp())


def _no_codes_or_bins(tokenizer) -> BanTokenRangeLogitsProcessor:
    return BanTokenRangeLogitsProcessor(tokenizer.convert_tokens_to_ids("<code_0>"))


def test_task_outputs_are_json_ready(pipe, photos):
    results = [pipe(photos[0], task="caption", max_new_tokens=5), pipe(photos[0], task="vqa", text="What is it"),
               pipe(photos[0], prompt=" what is in the corner?", max_new_tokens=5),
               pipe(photos[1], task="grounding", text="the red circle")]
    for result in results:
        assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize("task, text, prompt, settings", [
    ("caption", None, " what does the image describe?", dict(num_beams=5, max_new_tokens=5, no_repeat_ngram_size=3)),
    ("vqa", "What color is the square", " what color is the square?",
     dict(num_beams=5, min_new_tokens=1, max_new_tokens=8, length_penalty=0.0)),
])
def test_text_answer_is_what_generate_gives(pipe, model, processor, photos, task, text, prompt, settings):
    """OFA's prompt, beam 5, no code or bin tokens: the decoded text of generate's best sequence,
    scored by its probability (answer tokens and </s>)."""
    call = {"text": text} if text else {"max_new_tokens": settings["max_new_tokens"]}
    result = pipe(photos[0], task=task, **call)
    tokens, probability = _answer(model, _model_inputs(processor, photos[0], prompt),
                                  [_no_codes_or_bins(processor.tokenizer)], **settings)
    assert tokens and set(result) == {"text", "score"}
    assert result["text"] == processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert result["score"] == pytest.approx(probability, rel=1e-3)


def test_grounding_box_is_what_generate_gives(pipe, model, processor, photos):
    """Beam 5 constrained to four bins (x0 < x1, y0 < y1) then </s>, or " none": the bins back in
    pixels of the original image (normalised mode: bin / 999 x side), scored by their probability."""
    tokenizer, (width, height) = processor.tokenizer, photos[1].size
    first_bin = tokenizer.convert_tokens_to_ids("<bin_0>")
    none_id, = tokenizer(" none", add_special_tokens=False).input_ids
    constraint = BoxSequenceLogitsProcessor(first_bin, first_bin + 1000, EOS, 1, none_id)
    prompt = ' which region does the text " the red circle " describe?'
    tokens, probability = _answer(model, _model_inputs(processor, photos[1], prompt), [constraint], num_beams=5,
                                  max_new_tokens=5)
    result = pipe(photos[1], task="grounding", text="the red circle")
    assert len(tokens) == 4, tokens  # a box, not " none": the comparison has something to see
    assert set(result) == {"boxes", "labels", "scores"}
    x0, y0, x1, y1 = (t - first_bin for t in tokens)
    expected = [round(x0 / 999 * width, 2), round(y0 / 999 * height, 2), round(x1 / 999 * width, 2),
                round(y1 / 999 * height, 2)]
    assert result["boxes"] == [pytest.approx(expected, abs=0.006)] and result["labels"] == ["the red circle"]
    assert result["scores"] == [pytest.approx(probability, rel=1e-3)]


def test_text_only_prompt(pipe, model, processor):
    prompt = " what is the complete text of \" a red <mask> \"?"
    result = pipe(None, prompt=prompt, max_new_tokens=4)
    tokens, probability = _answer(model, _model_inputs(processor, None, prompt),
                                  [_no_codes_or_bins(processor.tokenizer)], num_beams=5, max_new_tokens=4,
                                  no_repeat_ngram_size=3)
    assert tokens and result["text"] == processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert result["score"] == pytest.approx(probability, rel=1e-3)


def test_batch_returns_one_result_per_input_in_order(pipe, photos):
    singles = [pipe(photo, task="caption", max_new_tokens=6) for photo in photos]
    batched = pipe(photos, task="caption", batch_size=3, max_new_tokens=6)
    assert [r["text"] for r in batched] == [r["text"] for r in singles]
    np.testing.assert_allclose([r["score"] for r in batched], [r["score"] for r in singles], rtol=1e-4, atol=1e-9)


def test_num_return_sequences_gives_candidates(pipe, photos):
    result = pipe(photos[0], task="caption", num_beams=3, num_return_sequences=3, max_new_tokens=4)
    assert len(result["candidates"]) == 3


def test_bad_image_in_batch_is_an_error_record(pipe, photos, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    results = pipe([photos[0], str(not_image), photos[1]], task="caption", batch_size=3, max_new_tokens=4)
    assert "error" in results[1] and "notes.txt" in results[1]["error"]
    assert "text" in results[0] and "text" in results[2]


def test_bad_arguments(pipe, photos):
    with pytest.raises(ValueError, match="Unknown task 'segmentation'.*caption"):
        pipe(photos[0], task="segmentation")
    with pytest.raises(ValueError, match="task=.*prompt"):
        pipe(photos[0])
    with pytest.raises(ValueError, match="question"):
        pipe(photos[0], task="vqa")
    with pytest.raises(ValueError, match="not both"):
        pipe(photos[0], task="caption", prompt=" what?")
    with pytest.raises(ValueError, match="on_error must be one of"):
        pipe([photos[0]], task="caption", on_error="ignore")
    with pytest.raises(ValueError, match="Unknown prompt style 'poetic'"):
        pipe(photos[0], task="caption", style="poetic")
    with pytest.raises(ValueError, match="got 3 values for text but 2 inputs"):
        pipe(photos[:2], task="vqa", text=["a?", "b?", "c?"])


def test_list_tasks_covers_pipeline_tasks():
    assert {"caption", "vqa", "grounding"} <= set(ofa_ufo.list_tasks())


def test_vqa_answer_is_never_empty(pipe, photos):
    """Unnormalised beam scores favour stopping at once; an answer needs at least one token."""
    assert pipe(photos[2], task="vqa", text="is there a red circle?")["text"].strip()


# ---- transformers' loop: lists, generators, datasets, workers, dtype ----------------------------

QUESTIONS = ["what?", "what color is the big square in the corner?", "is it red", "how many circles are there?", "who"]


@pytest.fixture(scope="module")
def five(photos):
    return photos + [Image.fromarray(np.full((33, 21, 3), 90, dtype=np.uint8))]


@pytest.fixture(scope="module")
def one_by_one(pipe, five):
    """Reference answers: each input alone (no padding, no batching)."""
    return [pipe(photo, task="vqa", text=question, max_new_tokens=5) for photo, question in zip(five, QUESTIONS)]


def _same(results, reference):
    assert [r["text"] for r in results] == [r["text"] for r in reference]
    np.testing.assert_allclose([r["score"] for r in results], [r["score"] for r in reference], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_lists_generators_and_dict_items_match_one_by_one(pipe, five, one_by_one, batch_size):
    """Prompts of different lengths: batches are right-padded with <pad> and give the answers of single calls."""
    listed = pipe(five, task="vqa", text=QUESTIONS, batch_size=batch_size, max_new_tokens=5)
    assert isinstance(listed, list)
    _same(listed, one_by_one)
    generated = pipe((photo for photo in five), task="vqa", text=QUESTIONS, batch_size=batch_size, max_new_tokens=5)
    assert not isinstance(generated, list)  # streamed, as transformers streams generators
    _same(list(generated), one_by_one)
    items = [{"image": photo, "text": question} for photo, question in zip(five, QUESTIONS)]
    _same(pipe(items, task="vqa", batch_size=batch_size, max_new_tokens=5), one_by_one)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_datasets_through_key_dataset(pipe, five, batch_size):
    dataset = datasets.Dataset.from_dict({"image": five})
    singles = [pipe(photo, task="caption", max_new_tokens=5) for photo in five]
    results = list(pipe(KeyDataset(dataset, "image"), task="caption", batch_size=batch_size, max_new_tokens=5))
    assert len(results) == 5
    _same(results, singles)


def test_num_workers(pipe, five, one_by_one):
    _same(pipe(five, task="vqa", text=QUESTIONS, batch_size=2, num_workers=1, max_new_tokens=5), one_by_one)


@pytest.mark.parametrize("argument", ["dtype", "torch_dtype"])
def test_device_and_dtype(tiny_checkpoint, photos, argument):
    pipe = pipeline("ofa-ufo", model=str(tiny_checkpoint), device="cpu", **{argument: torch.bfloat16})
    assert pipe.model.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    answer = pipe(photos[0], task="caption", max_new_tokens=4)
    assert isinstance(answer["text"], str) and 0.0 <= answer["score"] <= 1.0


def test_text_only_batches_and_mixed_free_prompts(pipe, photos):
    infill = pipe([None, None], task="text_infill", text=["a red <mask>", "the <mask> on a gray background"],
                  batch_size=2, max_new_tokens=4)
    assert [set(r) for r in infill] == [{"text", "score"}] * 2
    alone = pipe(None, prompt=" what is the complete text of \" a red <mask> \"?", max_new_tokens=4)
    prompts = [" what is in the image?", " what is the complete text of \" a red <mask> \"?"]
    mixed = pipe([photos[0], None], prompt=prompts, batch_size=2, max_new_tokens=4)
    assert mixed[1]["text"] == alone["text"] and "text" in mixed[0]


# ---- errors: a single input raises, several give records ---------------------------------------


def test_single_bad_input_raises(pipe, photos, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.txt"):
        pipe(str(not_image), task="caption")
    with pytest.raises(ValueError, match="'caption' needs an input image: the `image` argument is None"):
        pipe(None, task="caption")
    with pytest.raises(TypeError, match="text must be a string.*got int: 5"):
        pipe(photos[0], task="vqa", text=5)
    with pytest.raises(TypeError, match="prompt must be a string.*got list"):
        pipe([photos[0]], prompt=[[" what?"]], on_error="raise")
    with pytest.raises(ValueError, match="prompt= is a list of 2 but there is one input"):
        pipe(photos[0], prompt=[" what?", " where?"])
    with pytest.raises(TypeError, match="prompt must be a string.*got int"):
        pipe(photos[0], prompt=5)
    assert "notes.txt" in pipe(str(not_image), task="caption", on_error="record")["error"]


def test_several_inputs_give_error_records_or_raise(pipe, photos):
    inputs = [photos[0], "no/such/file.png", None, {"image": photos[1], "text": 5}, photos[2]]
    for batch_size in (1, 3):
        results = pipe(inputs, task="vqa", text="what is it?", batch_size=batch_size, max_new_tokens=3)
        assert "file not found" in results[1]["error"] and "no/such/file.png" in results[1]["error"]
        assert "'vqa' needs an input image" in results[2]["error"]
        assert "text must be a string" in results[3]["error"]
        assert [set(results[i]) for i in (0, 4)] == [{"text", "score"}] * 2
        streamed = list(pipe(iter(inputs), task="vqa", text="what is it?", batch_size=batch_size, max_new_tokens=3))
        assert [set(r) for r in streamed] == [set(r) for r in results]
    with pytest.raises(ImageLoadError, match="no/such/file.png"):
        pipe(inputs, task="vqa", text="what is it?", on_error="raise")


def test_only_text_tasks_and_free_prompts_go_without_an_image():
    no_image = {name for name in ofa_ufo.list_tasks() if not get_task(name).needs_image}
    assert no_image == {"text_infill", "text_to_image"} and not get_task(FREE_PROMPT).needs_image


@pytest.mark.parametrize("settings, name", [
    (dict(num_beams=0), "num_beams"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"), (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(do_sample=True, temperature=-1), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_invalid_generation_settings_fail_before_any_model_work(pipe, photos, monkeypatch, settings, name):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(pipe, "preprocess", no_model_work)
    monkeypatch.setattr(pipe.model, "generate", no_model_work)
    with pytest.raises(ValueError, match=name):
        pipe(photos[0], task="caption", **settings)
    with pytest.raises(ValueError, match=name):  # a per-call error: raised for lists too, not recorded
        pipe(photos[:2], task="caption", batch_size=2, **settings)


def test_generation_settings_of_the_wrong_type(pipe, photos):
    with pytest.raises(TypeError, match="num_beams must be an integer >= 1, got 2.5"):
        pipe(photos[0], task="caption", num_beams=2.5)
    with pytest.raises(TypeError, match="top_p must be a number, got '0.5'"):
        pipe(photos[0], task="caption", do_sample=True, top_p="0.5")


def test_valid_generation_settings_pass():
    for settings in (dict(num_beams=5, num_return_sequences=5, max_new_tokens=1, top_k=0),
                     dict(do_sample=True, num_return_sequences=4, temperature=0.5, top_p=1.0),
                     dict(num_beams=1, temperature=0.0), dict(min_new_tokens=2, max_new_tokens=2), {}):
        check_generation_settings(settings)
    with pytest.raises(ValueError, match="min_new_tokens=3 is more than max_new_tokens=2"):
        check_generation_settings(dict(min_new_tokens=3, max_new_tokens=2))


def test_settings_given_to_pipeline_are_every_calls_defaults(tiny_checkpoint):
    image = np.zeros((20, 30, 3), np.uint8)
    short = pipeline("ofa-ufo", model=str(tiny_checkpoint), max_new_tokens=2, num_beams=1)
    plain = pipeline("ofa-ufo", model=str(tiny_checkpoint))
    expected = plain(image, task="caption", max_new_tokens=2, num_beams=1)
    assert short(image, task="caption") == expected
    assert short(image, task="caption", max_new_tokens=3) == plain(image, task="caption", max_new_tokens=3, num_beams=1)


def test_end_banned_runs_greedy_to_max_new_tokens_and_bans_only_the_first_end_token(model, processor, photos):
    scores = torch.tensor([[0.0, 5.0, 1.0, 2.0]])  # token 1 (the end) would win
    banned = end_banned([1, 3])(torch.zeros(1, 1, dtype=torch.long), scores)
    assert banned.tolist() == [[0.0, float("-inf"), 1.0, 2.0]] and scores[0, 1] == 5.0  # the input is untouched
    assert end_banned(2)(None, scores).tolist() == [[0.0, 5.0, float("-inf"), 2.0]]
    with torch.no_grad():
        out = model.generate(**_model_inputs(processor, photos[0], " what is it?"), max_new_tokens=5, num_beams=1,
                             do_sample=False, logits_processor=end_banned(EOS))[0].tolist()
    assert out[0] == START and len(out) == 6 and EOS not in out  # the start token + 5 new ones
