"""The text front-end (tasks/text): written text -> what ChatTTS is given to speak.

Pure and torch-free; the end-to-end checks through a real worker are in test_pipeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tasks.errors import SettingsError
from tasks.schema import JobValidationError, parse_job
from tasks.settings import Settings
from tasks.text.charset import TAG
from tasks.text.frontend import FrontEnd
from tasks.text.lexicon import Lexicon
from tasks.text.rules import Options

from .conftest import ROOT

CASES_FILE = Path(__file__).parent / "data" / "frontend_cases.tsv"


def _cases() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in CASES_FILE.read_text(encoding="utf-8").splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            lang, category, written, spoken = line.split("\t")
            rows.append((lang, category, written, spoken))
    return rows


CASES = _cases()
FE = FrontEnd()
# What ChatTTS' Normalizer keeps; anything else it would delete.
_CHATTTS_CHARS = set("，。、,. ") | {chr(c) for c in range(0x4E00, 0xA000)} | set(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def test_case_table_covers_every_category_in_both_languages() -> None:
    assert len(CASES) >= 150
    kinds = Counter(c[1].rsplit("_", 1)[0] for c in CASES)
    for kind in ("cardinal", "decimal", "negative", "ordinal", "fraction", "percent", "range", "money", "date",
                 "time", "phone", "code", "unit", "temperature", "symbol", "identifier"):
        assert kinds[kind] >= 2, kind
        assert any(c[1] == f"{kind}_zh" for c in CASES) or kind == "year", kind
    assert kinds["mixed"] >= 4 and kinds["tag"] >= 3 and kinds["abbreviation"] >= 5


@pytest.mark.parametrize("lang,category,written,spoken", CASES, ids=[f"{c[1]}:{c[2][:30]}" for c in CASES])
def test_written_reads_as_spoken(lang: str, category: str, written: str, spoken: str) -> None:
    out = FE.speak(written, lang)
    assert out.spoken_text == spoken
    assert out.dropped == ""


def test_issue_examples_keep_every_number() -> None:
    en = FE.speak("Your balance is $1,234.56, due on 12/03/2026. Call 555-0123.")
    assert en.spoken_text == ("Your balance is one thousand two hundred thirty four dollars and fifty six cents, "
                              "due on December third, twenty twenty six. Call five five five, zero one two three.")
    zh = FE.speak("您的余额为1234.56元，请于2026年12月3日前还款。")
    assert zh.spoken_text == "您的余额为一千二百三十四元五角六分，请于二零二六年十二月三日前还款。"
    assert (en.lang, zh.lang) == ("en", "zh")


def test_spoken_text_is_what_chattts_keeps_unchanged() -> None:
    """ChatTTS' own Normalizer (no language normalizer registered, and without its half- to
    full-width step, as the worker runs it: workers/engine/normalizer.py) changes nothing in
    the front-end's output: spoken_text is what the model is given."""
    from ChatTTS.norm import Normalizer

    norm = Normalizer(str(Path(sys.modules["ChatTTS"].__file__).parent / "res" / "homophones_map.json"))
    for _, _, written, spoken in CASES:
        assert norm(spoken, do_text_normalization=True, do_homophone_replacement=False, lang="en") == spoken, written


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(
    list("0123456789０１２３４５６７８９$€£¥%.,:/-+#@&*°℃ abcxyzABCKMmgk年月日元点第号你好\n[]_()") + ["[uv_break]"]),
    max_size=80).map("".join))
def test_no_digit_survives_and_output_is_chattts_text(text: str) -> None:
    out = FE.speak(text)
    body = TAG.sub("", out.spoken_text)
    assert not any(ch.isdigit() for ch in body), (text, out.spoken_text)
    assert set(body) <= _CHATTTS_CHARS, (text, out.spoken_text)
    assert out.spoken_text.count("[uv_break]") == text.count("[uv_break]")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_read_without_error(text: str) -> None:
    out = FE.speak(text, "auto")
    assert set(TAG.sub("", out.spoken_text)) <= _CHATTTS_CHARS
    assert not any(ch.isdigit() for ch in out.spoken_text)


def test_what_has_no_reading_is_reported_not_silently_lost() -> None:
    out = FE.speak("Hello 😀 world ☃☃ こんにちは")
    assert out.spoken_text == "Hello world"
    assert out.dropped == "😀☃こんにちは" and out.dropped_count == 8
    assert FE.speak("Quotes “like” 'these' are not spoken").dropped == ""


def test_normalize_false_sends_text_as_written() -> None:
    out = FE.speak("Pay $5 at 3:30!", normalize=False)
    # Only ChatTTS' character rules: the digits and "$" go (and are reported as such).
    assert out.spoken_text == "Pay at."
    assert (out.dropped, out.dropped_count) == ("$530", 5)


def test_forced_language_and_unknown_language() -> None:
    assert FE.speak("Room 12", "zh").spoken_text == "Room 十二"
    assert FE.speak("第12名", "en").spoken_text == "第 twelve 名"
    with pytest.raises(ValueError, match="lang must be"):
        FE.speak("x", "fr")


def test_date_order_and_yao_are_options() -> None:
    text = "Due 03/04/2026."
    assert FrontEnd(Options(date_order="mdy")).speak(text).spoken_text == "Due March fourth, twenty twenty six."
    assert FrontEnd(Options(date_order="dmy")).speak(text).spoken_text == \
        "Due the third of April, twenty twenty six."
    assert FrontEnd(Options(date_order="ymd")).speak("Due 26/04/05.").spoken_text == \
        "Due April fifth, twenty twenty six."
    assert FrontEnd(Options(yao=True)).speak("请拨打110或13812345671。").spoken_text == \
        "请拨打幺幺零或幺三八，幺二三四，五六七幺。"
    assert FrontEnd(Options(yao=True)).speak("验证码是101。").spoken_text == "验证码是幺零幺。"


def test_settings_configure_the_front_end(tmp_path: Path) -> None:
    lexicon = tmp_path / "lexicon.tsv"
    lexicon.write_text("# brand names\nAWS\tA W S\n3M\tthree M\nTTSPool\ttee tee ess pool\n京东\t京东商城\n",
                       encoding="utf-8")
    s = Settings.from_env({"TTSPOOL_LEXICON": str(lexicon), "TTSPOOL_DATE_ORDER": "DMY", "TTSPOOL_PHONE_YAO": "1"})
    assert (s.lexicon, s.date_order, s.phone_yao) == (str(lexicon), "dmy", True)
    fe = FrontEnd.from_settings(s)
    # Before the rules ("3M" would be "three M" anyway; "AWS" is whole-word and case-sensitive).
    assert fe.speak("AWS and 3M use TTSPool, not aws or AWSome.").spoken_text == \
        "A W S and three M use tee tee ess pool, not aws or AWSome."
    assert fe.speak("在京东买了1个").spoken_text == "在京东商城买了一个"
    assert fe.speak("Due 03/04/2026.").spoken_text == "Due the third of April, twenty twenty six."
    assert Settings.from_env({"TTSPOOL_LEXICON": str(lexicon)}).to_env()["TTSPOOL_LEXICON"] == str(lexicon)
    with pytest.raises(SettingsError, match="TTSPOOL_DATE_ORDER"):
        Settings.from_env({"TTSPOOL_DATE_ORDER": "month-first"})


def test_a_bad_lexicon_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("ok\tfine\nno tab here\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"bad.tsv:2: expected `written<TAB>spoken`"):
        Lexicon.load(bad)
    with pytest.raises(SettingsError, match="cannot read"):
        Lexicon.load(tmp_path / "missing.tsv")


def test_job_fields_lang_and_normalize() -> None:
    job = parse_job({"text": "hi", "lang": "zh", "normalize": False})
    assert (job.lang, job.normalize) == ("zh", False)
    assert job.task_kwargs()["lang"] == "zh" and job.task_kwargs()["normalize"] is False
    # At their defaults they stay off the wire: older workers still take the message.
    assert not {"lang", "normalize"} & set(parse_job({"text": "hi"}).task_kwargs())
    with pytest.raises(JobValidationError, match="lang"):
        parse_job({"text": "hi", "lang": "fr"})
    with pytest.raises(JobValidationError, match="normalize"):
        parse_job({"text": "hi", "normalize": "yes"})


def test_cli_normalize_prints_spoken_form_without_torch() -> None:
    code = ("import sys; from tasks.cli import main; rc = main(['normalize', '--json', 'Call 555-0123 at 9am. 😀']); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"text": "Call 555-0123 at 9am. 😀", "lang": "en", "dropped": "😀",
                                      "spoken_text": "Call five five five, zero one two three at nine A M."}
    assert "no reading for '😀'" in out.stderr
    plain = subprocess.run([sys.executable, "-m", "tasks.cli", "normalize", "--lang", "zh", "-"], cwd=ROOT,
                           input="第3名", capture_output=True, text=True, timeout=60)
    assert plain.stdout == "第三名\n", plain.stderr


def test_cli_normalize_json_always_has_dropped() -> None:
    """`dropped` as in a job's result: the characters left out, each once; "" when none."""
    out = subprocess.run([sys.executable, "-m", "tasks.cli", "normalize", "--json", "价格是￥1234.5元 ☃☃ 😀"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"text": "价格是￥1234.5元 ☃☃ 😀", "spoken_text": "价格是一千二百三十四元五角",
                                      "lang": "zh", "dropped": "☃😀"}
    clean = subprocess.run([sys.executable, "-m", "tasks.cli", "normalize", "--json", "Q3 2024"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert json.loads(clean.stdout)["dropped"] == "" and clean.stderr == ""


# -- issue 34 -----------------------------------------------------------------------

@pytest.mark.parametrize("written,spoken", [
    ("价格是￥1234.5元", "价格是一千二百三十四元五角"),
    ("价格是¥1234.5元", "价格是一千二百三十四元五角"),
    ("￥5块钱一斤", "五元一斤"),
    ("RMB 100元", "一百元"),
    ("¥1200日元", "一千二百日元"),
    ("$5 dollars", "five dollars"),
    ("HK$5 dollars", "five Hong Kong dollars"),
    ("$5 HKD", "five Hong Kong dollars"),
    ("£20 pounds", "twenty pounds"),
    ("$10-20 dollars", "ten to twenty dollars"),
    ("$2 million dollars", "two million dollars"),
    # A unit word naming another currency is not the sign's: it is read as written.
    ("$5 EUR", "five dollars EUR"),
    ("$5 pounds of flour", "five dollars pounds of flour"),
])
def test_a_currency_sign_and_its_unit_word_read_the_unit_once(written: str, spoken: str) -> None:
    assert FE.speak(written).spoken_text == spoken


_AMOUNTS = st.one_of(st.integers(0, 10**9).map(str),
                     st.tuples(st.integers(0, 99999), st.integers(0, 99)).map(lambda t: f"{t[0]}.{t[1]:02d}"),
                     st.integers(1000, 999999).map(lambda n: f"{n:,}"))


@settings(max_examples=200, deadline=None)
@given(_AMOUNTS, st.sampled_from(["￥", "¥"]), st.sampled_from(["元", "块", "块钱", " 元", "人民币"]))
def test_a_yuan_amount_with_sign_and_unit_word_reads_its_unit_once(amount: str, sign: str, word: str) -> None:
    with_word = FE.speak(f"价格是{sign}{amount}{word}。").spoken_text
    assert with_word == FE.speak(f"价格是{sign}{amount}。").spoken_text
    assert with_word.count("元") <= 1


@settings(max_examples=200, deadline=None)
@given(_AMOUNTS, st.sampled_from([("$", "dollars"), ("$", "USD"), ("€", "euros"), ("£", "pounds"),
                                  ("HK$", "dollars"), ("₹", "rupees")]))
def test_an_amount_with_sign_and_unit_word_reads_like_the_sign_alone(amount: str, sign_word: tuple[str, str]) -> None:
    sign, word = sign_word
    assert FE.speak(f"It costs {sign}{amount} {word} today.").spoken_text == \
        FE.speak(f"It costs {sign}{amount} today.").spoken_text


@pytest.mark.parametrize("written,spoken", [
    ("Price: ￥1234.5元", "Price, 一千二百三十四元五角"),
    ("Hello, 世界。", "Hello, 世界。"),
    ("你好,世界.", "你好，世界。"),  # half-width marks in Chinese clauses, as ChatTTS would have them
    ("这个 iPhone, 很好。", "这个 iPhone，很好。"),
    ("The flight leaves at 9:05，请准时。", "The flight leaves at nine oh five, 请准时。"),
    ("Thanks!谢谢！", "Thanks. 谢谢。"),
])
def test_punctuation_follows_the_language_of_its_clause(written: str, spoken: str) -> None:
    assert FE.speak(written).spoken_text == spoken


@pytest.mark.parametrize("written,spoken", [
    ("https://example.com/a?b=1", "example dot com slash a question mark b equals one"),
    ("Visit https://example.com/a?b=1. Thanks!",
     "Visit example dot com slash a question mark b equals one. Thanks."),
    ("See https://example.com/a/123?x=1&y=two#top now.",
     "See example dot com slash a slash one two three question mark x equals one and y equals two hash top now."),
    ("Docs: https://en.wikipedia.org/wiki/Foo_(bar).",
     "Docs, en dot wikipedia dot org slash wiki slash Foo underscore open paren bar close paren."),
    ("Is it https://example.com/?", "Is it example dot com."),
    ("Go to example.com/help?q=1 today.", "Go to example dot com slash help question mark q equals one today."),
    ("Node.js is not a web address.", "Node. js is not a web address."),
    ("Mail a.b-c@x.co.uk now.", "Mail a dot b dash c at x dot co dot uk now."),
    ("请访问https://example.com/a?b=1。", "请访问example 点 com 斜杠 a 问号 b 等于一。"),
])
def test_a_url_is_read_whole_never_broken_into_sentences(written: str, spoken: str) -> None:
    assert FE.speak(written).spoken_text == spoken


_LABELS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_URLS = st.builds(
    lambda scheme, host, tld, path, query: f"{scheme}{'.'.join(host)}.{tld}{path}{query}",
    st.sampled_from(["https://", "http://", "https://www.", ""]),
    st.lists(_LABELS, min_size=1, max_size=3), st.sampled_from(["com", "org", "io", "co.uk", "cn"]),
    st.lists(_LABELS, max_size=3).map(lambda p: "".join(f"/{s}" for s in p)),
    st.lists(st.tuples(_LABELS, _LABELS), max_size=3).map(
        lambda q: ("?" + "&".join(f"{k}={v}" for k, v in q)) if q else ""),
)
_SENTENCES = st.lists(st.sampled_from(["Please", "see", "the", "page", "at", "now", "or", "call", "us"]),
                      min_size=1, max_size=5).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(_URLS, _SENTENCES, _SENTENCES, st.sampled_from([".", "?", "!", ",", ""]))
def test_a_url_in_any_sentence_is_never_split(url: str, before: str, after: str, end: str) -> None:
    alone = FE.speak(url, "en").spoken_text
    assert not set(alone) & set(",.，。"), (url, alone)
    spoken = FE.speak(f"{before} {url}{end} {after}.", "en").spoken_text
    assert f" {alone}" in spoken, (url, spoken)


@pytest.mark.parametrize("written,spoken", [
    ("Q3 2024", "Q three twenty twenty four"),
    ("Revenue grew in Q3 2024.", "Revenue grew in Q three twenty twenty four."),
    ("H1 2025 results", "H one twenty twenty five results"),
    ("in 2024", "in twenty twenty four"),
    ("FY2024", "F Y twenty twenty four"),
    ("FY 2024", "FY twenty twenty four"),
    ("FY2024-25", "F Y twenty twenty four to twenty five"),
    ("2024-25", "twenty twenty four to twenty five"),
    ("the 2024/25 season", "the twenty twenty four to twenty five season"),
    ("1999-00", "nineteen ninety nine to two thousand"),
    ("2004-05", "two thousand four to two thousand five"),
    ("Dec 3, 2024", "December third, twenty twenty four"),
    ("2024-26 km", "twenty twenty four to twenty six kilometers"),
    ("营收在Q3 2024增长", "营收在Q 三二零二四增长"),
    ("2024-25财年", "二零二四到二五财年"),
    ("Q3 2048 units", "Q three twenty forty eight units"),
])
def test_a_year_reads_as_a_year_after_a_quarter_and_in_year_contexts(written: str, spoken: str) -> None:
    assert FE.speak(written).spoken_text == spoken
