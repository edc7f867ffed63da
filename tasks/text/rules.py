"""The front-end's rules: what a written span is (a price, a date, a phone number ...)
and how it is read in the language around it.

Each rule is a pattern and a reading; the front-end (frontend.py) scans the text,
takes the earliest match (the first rule in RULES on a tie) and asks the rule for its
reading in the span's language. A reading may decline (None): the span is then left
to the next rule that matches there. The libraries read the numbers
(readings_en / readings_zh); these rules decide which reading a span gets, which is
what no library here gets right (see docs/TEXT.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Literal

from . import readings_en, readings_zh
from .charset import TAG

Lang = Literal["en", "zh"]
DateOrder = Literal["mdy", "dmy", "ymd"]


@dataclass(frozen=True)
class Options:
    # How a numeric date whose order is ambiguous (03/04/2026) is read.
    date_order: DateOrder = "mdy"
    # Chinese phone numbers and codes with 1 read 幺 (yāo), as dispatchers and airlines do.
    yao: bool = False


@dataclass(frozen=True)
class Spot:
    """Where a match is: the whole text, the span's language and the options."""

    text: str
    lang: Lang
    options: Options

    @property
    def say(self) -> ModuleType:
        return readings_en if self.lang == "en" else readings_zh

    def digits(self, s: str) -> str:
        return readings_zh.digits(s, self.options.yao) if self.lang == "zh" else readings_en.digits(s)

    def phone(self, groups: list[str], country: str | None) -> str:
        if self.lang == "zh":
            return readings_zh.phone(groups, country, self.options.yao)
        return readings_en.phone(groups, country)


Reading = Callable[[re.Match[str], Spot], "str | None"]


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    read: Reading


# A web address is one unit, read whole: its "?" or "." never ends a sentence. Its path
# and query end before a closing mark a sentence puts after it ("see https://a.com/x.").
# A closing parenthesis is the URL's own only when it closes one opened in it
# ("wiki/Foo_(bar)").
_URL_PAREN = r"\([\w/.~%?=&#+:@,;!*$'-]*\)"
# Without a scheme or "www.", only a name ending in a common top-level domain is taken
# for one ("example.com"; not "Node.js"); the TLDs that are English words are left out.
_TLD = r"(?:com|org|net|edu|gov|io|dev|app|ai|co|tv|info|biz|cn|uk|de|fr|jp|hk|tw|sg|au|ca|ru|eu|nl|ch|kr|xyz|ly|gg|fm)"
URL = (r"(?:(?:https?://|(?<![A-Za-z0-9.])www\.)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
       rf"|(?<![A-Za-z0-9.@/_-])[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.{_TLD}(?![A-Za-z0-9-]))(?::\d{{1,5}})?"
       rf"(?:[/?#](?:(?:[\w/.~%?=&#+:@,;!*$'-]|{_URL_PAREN})*(?:[\w/~%=&#+@*$-]|{_URL_PAREN}))?)?")
EMAIL = r"[A-Za-z0-9._+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"

# No match may begin inside a number: without the guard, rules that fail after a long
# run of digits would retry from every digit in it (quadratic in the run's length).
NUM = r"(?<!\d)(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NEG = r"(?:(?<![A-Za-z0-9.,])[-−–](?=[\d.$€£¥]))"
_MONTH = (r"(Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_MONTHS = {m: i for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), 1)}
_FULL_MONTHS = frozenset(readings_en.month_name(i) for i in range(1, 13))
# Longest first, so "km/h" wins over "km" and "kWh" over "kW".
_UNIT = (r"(km/h|sq ft|kWh|mph|km²|km2|km|kg|cm|mm|mg|ml|mL|kW|GHz|MHz|kHz|Hz|GB|MB|TB|KB|lbs|lb|oz|ft|mi"
         r"|ms|min|hrs|hr|m²|m2|m|g|L|W|V)")
_MERIDIEM = r"([AaPp])(?:\.\s?[Mm]\.|\s?[Mm])(?![A-Za-z])"
_CURRENCY_SIGNS = {"$": "USD", "US$": "USD", "€": "EUR", "£": "GBP", "￥": "CNY", "₹": "INR", "₩": "KRW",
                   "₽": "RUB", "HK$": "HKD", "A$": "AUD", "C$": "CAD", "NT$": "TWD", "S$": "SGD", "¢": "USD¢"}
_CURRENCY_CODES = {"USD": "USD", "EUR": "EUR", "GBP": "GBP", "JPY": "JPY", "CNY": "CNY", "RMB": "CNY",
                   "INR": "INR", "HKD": "HKD", "AUD": "AUD", "CAD": "CAD", "元": "CNY"}


# A unit word after a signed amount ("￥5元", "$5 dollars", "¥1200日元") names the
# currency the sign already gave: the amount is read with its unit once. None: any
# currency of the sign's own kind ("dollars" after HK$ is Hong Kong dollars).
_UNIT_WORDS: dict[str, str | None] = {
    **{w: "CNY" for w in ("元", "圆", "块钱", "块", "人民币", "yuan", "RMB", "CNY")},
    **{w: "USD" for w in ("美元", "美金", "USD")}, **{w: "JPY" for w in ("日元", "円", "yen", "JPY")},
    **{w: "EUR" for w in ("欧元", "euros", "euro", "EUR")}, **{w: "GBP" for w in ("英镑", "pounds", "pound", "GBP")},
    **{w: "INR" for w in ("卢比", "rupees", "rupee", "INR")}, "韩元": "KRW", "卢布": "RUB",
    "港元": "HKD", "港币": "HKD", "HKD": "HKD", "澳元": "AUD", "AUD": "AUD", "加元": "CAD", "CAD": "CAD",
    "dollars": None, "dollar": None,
}
_DOLLARS = frozenset({"USD", "HKD", "AUD", "CAD", "SGD", "TWD"})
_UNIT_WORD = "|".join(sorted(map(re.escape, _UNIT_WORDS), key=len, reverse=True))


def _with_unit_word(sign_currency: str, sign: str, word: str) -> str | None:
    """The currency a sign and the unit word after it name together, or None when the
    word names another currency ("$5 EUR"): that word is then read as written."""
    named = _UNIT_WORDS[word]
    if named is None:
        return sign_currency if sign_currency in _DOLLARS else None
    if named == sign_currency or (sign in ("¥", "￥") and named in ("CNY", "JPY")):
        return named
    return named if sign == "$" and named in _DOLLARS else None


def _money_unit(sign: str, spot: Spot) -> str:
    # ¥ is the sign of both the yen and the yuan: read by the language around it.
    if sign == "¥":
        return "CNY" if spot.lang == "zh" else "JPY"
    return _CURRENCY_SIGNS.get(sign) or _CURRENCY_CODES[sign.upper()]


def _signed(neg: str | None, reading: str, spot: Spot) -> str:
    return (("负" if spot.lang == "zh" else "minus ") + reading) if neg else reading


def _money(m: re.Match[str], spot: Spot) -> str:
    return _read_money(m.groupdict(), spot)


def _read_money(m: dict[str, str | None], spot: Spot) -> str:
    neg, amount, scale = m["neg"], str(m["amount"]), m["scale"]
    sign = str(m["sign"] or m["code"])
    currency = _money_unit(sign, spot)
    word = m["word"]
    if word:
        named = _with_unit_word(currency, sign, word)
        if named is None:
            return f"{_read_money({**m, 'word': None}, spot)} {word}"
        currency = named
    if currency == "USD¢":  # "5¢"
        return spot.say.number(amount) + (" cents" if spot.lang == "en" else "美分")
    spoken = _signed(neg, spot.say.money(amount, currency, scale), spot)
    if m["upto"]:
        # "$10-20": the first amount is a bare number, the currency is said once.
        upper = spot.say.money(m["upto"], currency, scale)
        lower = spot.say.number(amount) + (f" {readings_en.SCALES[scale.lower()]}" if scale and spot.lang == "en" else "")
        sep = " " if spot.lang == "en" else ""
        spoken = f"{_signed(neg, lower, spot)}{sep}{spot.say.range_word()}{sep}{upper}"
    return spoken


def _is_year(s: str) -> bool:
    return len(s) == 4 and s.isdigit() and 1100 <= int(s) <= 2099


# A quarter, a half or a fiscal year before a number: the number is a year ("Q3 2024",
# "FY2024", "H1-2025"), read as dates read it.
_YEAR_TAG = re.compile(r"(?<![A-Za-z])(?:Q[1-4]|H[12]|FY|CY)[\s-]?$")


def _year_span(lo: str, hi: str, spot: Spot) -> str | None:
    """"2024-25", "2024/25": a fiscal or school year, the second year by its last two digits."""
    if not (_is_year(lo) and len(hi) == 2 and hi.isdigit() and int(hi) == (int(lo) + 1) % 100):
        return None
    if spot.lang == "zh":
        return f"{readings_zh.year(int(lo))}{readings_zh.range_word()}{readings_zh.digits(hi)}"
    # "2024-25" is said "to twenty five"; "2004-05" and "1999-00" the whole next year.
    second = readings_en.cardinal(int(hi)) if int(hi) >= 10 else readings_en.year(int(lo) + 1)
    return f"{readings_en.year(int(lo))} to {second}"


def _plain(s: str, spot: Spot) -> str:
    """A number in a range or list: a year when it looks like one, else as written."""
    return spot.say.year(int(s)) if _is_year(s) else spot.say.number(s)


def _date(y: str | None, m: int, d: int | None, spot: Spot, day_first: bool | None = None) -> str | None:
    if not 1 <= m <= 12 or (d is not None and not 1 <= d <= 31):
        return None
    year = None
    if y is not None:
        year = int(y) + (2000 if len(y) == 2 else 0)
    first = spot.options.date_order == "dmy" if day_first is None else day_first
    return str(spot.say.date(year, m, d, first))


def _iso_date(m: re.Match[str], spot: Spot) -> str | None:
    return _date(m[1], int(m[2]), int(m[3]), spot)


def _numeric_date(m: re.Match[str], spot: Spot) -> str | None:
    a, b, c = m[1], m[3], m[4]
    if m[2] == "." and 4 not in (len(a), len(c)):
        return None  # "1.2.13" is a version, not a date
    if len(a) == 4:
        return _date(a, int(b), int(c), spot)
    if len(a) > 2 or len(c) not in (2, 4):
        return None
    first, second = int(a), int(b)
    order = spot.options.date_order
    if order == "ymd":
        return _date(a, second, int(c), spot)
    if first > 12 or (second <= 12 and order == "dmy"):
        return _date(c, second, first, spot, day_first=True)
    return _date(c, first, second, spot, day_first=False)


def _month(name: str) -> int:
    return _MONTHS[name[:3].lower()]


def _written_date(m: re.Match[str], spot: Spot) -> str | None:
    if m["day2"]:  # "March 3-5"
        first = _date(None, _month(m["month"]), int(m["day"]), spot, day_first=False)
        last = _date(m["year"], _month(m["month"]), int(m["day2"]), spot, day_first=False)
        if first is None or last is None:
            return None
        if spot.lang == "zh":
            return f"{first}到{readings_zh.cardinal(int(m['day2']))}日"
        return f"{first} to the {readings_en.ordinal(int(m['day2']))}" + (last[last.index(","):] if m["year"] else "")
    return _date(m["year"], _month(m["month"]), int(m["day"]), spot, day_first=False)


def _written_date_day_first(m: re.Match[str], spot: Spot) -> str | None:
    spoken = _date(m["year"], _month(m["month"]), int(m["day"]), spot, day_first=True)
    if spoken is None:
        return None
    if spot.lang == "en" and re.search(r"\bthe\s+$", spot.text[:m.start()], re.IGNORECASE):
        spoken = spoken.removeprefix("the ")  # "on the 3rd of March"
    # The dot after a full month name ends the sentence ("on 4 July. Then ...").
    if m["dot"] and m["month"] in _FULL_MONTHS and not m["year"]:
        spoken += "."
    return spoken


def _month_year(m: re.Match[str], spot: Spot) -> str:
    if spot.lang == "zh":
        return f"{readings_zh.year(int(m[2]))}年{readings_zh.month_name(_month(m[1]))}"
    return f"{readings_en.month_name(_month(m[1]))} {readings_en.year(int(m[2]))}"


def _clock(h: str, mi: str | None, ap: str | None) -> tuple[int, int, str | None] | None:
    hour, minute = int(h), int(mi or 0)
    meridiem = f"{ap}m" if ap else None
    if hour > 24 or minute > 59 or (meridiem and not 1 <= hour <= 12):
        return None
    return hour, minute, meridiem


def _time_range(m: re.Match[str], spot: Spot) -> str | None:
    """"9am-5pm", "2-3pm", "10:00-12:00": two times; a bare "3-5" is left to ranges."""
    if not ((m["m1"] and m["m2"]) or m["ap2"] or m["ap1"]):
        return None
    a = _clock(m["h1"], m["m1"], m["ap1"] or m["ap2"])
    b = _clock(m["h2"], m["m2"], m["ap2"])
    if a is None or b is None:
        return None
    if m["ap1"] or spot.lang == "zh":
        first = spot.say.time_of_day(a[0], a[1], None, a[2] if m["ap1"] else None)
    else:  # "2-3pm": two to three P M
        first = readings_en.time_of_day(a[0], a[1], None, "am").removesuffix(" A M")
    last = spot.say.time_of_day(*b[:2], None, b[2])
    return f"{first}到{last}" if spot.lang == "zh" else f"{first} to {last}"


def _ratio(m: re.Match[str], spot: Spot) -> str:
    """"3:2", "16:9": a score or a ratio (a time has two digits after the colon)."""
    a, b = spot.say.number(m[1]), spot.say.number(m[2])
    return f"{a}比{b}" if spot.lang == "zh" else f"{a} to {b}"


def _version(m: re.Match[str], spot: Spot) -> str | None:
    """"v2.1.3", "iOS 17.4.1", "192.168.1.1": parts, read one by one."""
    parts = m[0].lstrip("vV").split(".")
    if not m["v"] and (len(parts) < 3 or any(len(p) > 3 for p in parts)):
        return None  # "3.14" is a decimal; "415.555.2671" a phone number
    words = [spot.digits(p) if len(p) > 2 or (p[0] == "0" and len(p) > 1) else spot.say.number(p) for p in parts]
    joined = ("点" if spot.lang == "zh" else " point ").join(words)
    return f"V {joined}" if m["v"] else joined


def _time(m: re.Match[str], spot: Spot) -> str | None:
    h, mi = int(m[1]), int(m[2])
    s = int(m[3]) if m[3] else None
    meridiem = f"{m[4]}m" if m[4] else None
    if h > 24 or mi > 59 or (s is not None and s > 59) or (meridiem and not 1 <= h <= 12):
        return None
    return str(spot.say.time_of_day(h, mi, s, meridiem)) + _sentence_dot(m, spot)


def _hour_meridiem(m: re.Match[str], spot: Spot) -> str | None:
    h = int(m[1])
    if not 1 <= h <= 12:
        return None
    return str(spot.say.time_of_day(h, 0, None, f"{m[2]}m")) + _sentence_dot(m, spot)


def _sentence_dot(m: re.Match[str], spot: Spot) -> str:
    """The dot of "p.m." may also end the sentence: keep that pause."""
    after = spot.text[m.end():]
    return "." if m[0].endswith(".") and (not after.strip() or re.match(r"\s+[A-Z]", after)) else ""


def _phone(m: re.Match[str], spot: Spot) -> str | None:
    number = m["number"].replace("(0)", " ")  # "+44 (0)20 ...": the trunk 0 is not dialled from abroad
    groups = [g for g in re.split(r"\D+", number) if g]
    if not m["country"] and len(groups) > 1 and not re.search(r"[().-]", number):
        # Only spaces between the groups: a list of numbers ("100 200 300", "2019 2020
        # 2021") unless it ends in a four-digit group that is not a year.
        if len(groups[-1]) != 4 or all(_is_year(g) for g in groups):
            return None
    if len(groups) == 1 and len(groups[0]) == 11:  # a Chinese mobile number: 3-4-4
        groups = [groups[0][:3], groups[0][3:7], groups[0][7:]]
    if m["country"] and not m["country"].startswith("+"):
        groups.insert(0, m["country"])  # a trunk prefix ("1-800-..."): said as a digit, not "plus"
    country = m["country"][1:] if m["country"] and m["country"].startswith("+") else None
    return spot.phone(groups, country)


def _temperature(m: re.Match[str], spot: Spot) -> str:
    scale = "C" if (m["scale"] or "").upper() == "C" or m["sym"] == "℃" else "F"
    amount = ("-" if m["neg"] else "") + m["amount"]
    if not m["amount2"]:
        return str(spot.say.temperature(amount, scale))
    # "-5～3℃", "20-25°C": the unit is said once, after the second value.
    upper = spot.say.temperature(("-" if m["neg2"] else "") + m["amount2"], scale)
    if spot.lang == "zh":
        lower = ("零下" if m["neg"] else "") + readings_zh.number(m["amount"])
        return f"{lower}到{upper}"
    return f"{readings_en.number(amount)} to {upper}"


def _percent(m: re.Match[str], spot: Spot) -> str:
    amount = ("-" if m["neg"] else "") + m["amount"]
    if m[0].endswith("‰"):
        if spot.lang == "zh":
            return "千分之" + readings_zh.number(amount)
        return readings_en.number(amount) + " per mille"
    return str(spot.say.percent(amount))


def _percent_range(m: re.Match[str], spot: Spot) -> str:
    if spot.lang == "zh":
        return f"{readings_zh.percent(m[1])}到{readings_zh.percent(m[2])}"
    return f"{readings_en.number(m[1])} to {readings_en.percent(m[2])}"


def _range(m: re.Match[str], spot: Spot) -> str:
    lo, hi, unit = m[1], m[2], m[3]
    sep = " " if spot.lang == "en" else ""
    spoken = ((None if unit else _year_span(lo, hi, spot))
              or f"{_plain(lo, spot)}{sep}{spot.say.range_word()}{sep}{_plain(hi, spot)}")
    if unit:
        name = spot.say.unit(hi, unit)
        spoken += name[len(spot.say.number(hi)):]
    return spoken


def _unit(m: re.Match[str], spot: Spot) -> str:
    return str(spot.say.unit(("-" if m["neg"] else "") + m["amount"], m["unit"]))


def _hours(m: re.Match[str], spot: Spot) -> str:
    if spot.lang == "zh":
        return readings_zh.number(m[1]) + "小时"
    return f"{readings_en.number(m[1])} {readings_en.plural(m[1], ('hour', 'hours'))}"


def _ordinal(m: re.Match[str], spot: Spot) -> str:
    return str(spot.say.ordinal(int(m[1])))


def _fraction(m: re.Match[str], spot: Spot) -> str | None:
    whole, num, den = m["whole"], m["num"], m["den"]
    if "." in num or (not whole and den in ("5", "10", "100") and float(num) <= int(den)):
        # A rating or a score: "4.5/5", "95/100".
        a, b = spot.say.number(num), spot.say.number(den)
        return f"{b}分之{a}" if spot.lang == "zh" else f"{a} out of {b}"
    if not whole and (span := _year_span(num, den, spot)):
        return span
    if not whole and num == den:
        return f"{spot.say.number(num)}{'' if spot.lang == 'zh' else ' '}{spot.say.number(den)}"  # "50/50"
    n, d = int(num), int(den)
    order = spot.options.date_order
    month_day = (order != "dmy" and 1 <= n <= 12 and 11 <= d <= 31) or (order == "dmy" and 1 <= d <= 12 and 13 <= n <= 31)
    if ((num[0] == "0" or den[0] == "0") or month_day) and not whole:
        # A leading zero makes it a day and a month ("12/03"), in the configured order.
        if spot.options.date_order == "dmy":
            return _date(None, int(den), int(num), spot, day_first=True)
        return _date(None, int(num), int(den), spot, day_first=False)
    if int(den) == 0:
        return None
    if (num, den) == ("24", "7") and not whole:
        return "twenty four seven" if spot.lang == "en" else "全天候"
    spoken = str(spot.say.fraction(int(num), int(den)))
    if whole:
        joiner = " and " if spot.lang == "en" else "又"
        spoken = f"{spot.say.number(whole)}{joiner}{spoken}"
    return spoken


def _per(m: re.Match[str], spot: Spot) -> str:
    """"$9.99/mo", "/night", "/月": per period."""
    unit = {"mo": "month", "yr": "year", "wk": "week", "hr": "hour"}.get(m["per"], m["per"])
    return f"每{unit}" if spot.lang == "zh" and not unit.isascii() else f"per {unit}"


def _arithmetic(m: re.Match[str], spot: Spot) -> str:
    if "^" in m[0]:
        return "的次方" if spot.lang == "zh" else "to the power of"
    return "乘" if spot.lang == "zh" else "times"


def _hash_number(m: re.Match[str], spot: Spot) -> str:
    # "#5" is a gate or an item; "#329053" is an order number, read digit by digit.
    n = spot.digits(m[1]) if len(m[1]) >= 4 else spot.say.number(m[1])
    return f"{n}号" if spot.lang == "zh" else f"number {n}"


def _identifier(m: re.Match[str], spot: Spot) -> str:
    """Flight, order and model numbers: short letter runs spelled, long digit runs
    read digit by digit ("UA857" -> "U A eight five seven", "COVID-19" -> "COVID nineteen")."""
    parts = []
    year = ""  # the run before, when it was read as a year
    for found in re.finditer(r"[A-Za-z]+|\d+|\.", m[0]):
        run, after_year, year = found[0], year, ""
        if after_year and (span := _year_span(after_year, run, spot)):
            parts[-1] = span  # "FY2024-25"
        elif run == ".":
            parts.append("点" if spot.lang == "zh" else "point")
        elif _is_year(run) and _YEAR_TAG.search(m[0], 0, found.start()):
            parts.append(spot.say.year(int(run)))
            year = run
        elif run.isdigit():
            parts.append(spot.digits(run) if len(run) > 2 or run[0] == "0" else spot.say.number(run))
        else:
            parts.append(run if len(run) >= 4 else readings_en.letters(run))
    return " ".join(parts)


_TITLES = {"Dr": "Doctor", "Mr": "Mister", "Mrs": "Missus", "Ms": "Miz", "Prof": "Professor", "St": "Saint",
           "Mt": "Mount", "Ft": "Fort", "Sgt": "Sergeant", "Capt": "Captain", "Gen": "General",
           "Gov": "Governor", "Sen": "Senator", "Rep": "Representative", "Rev": "Reverend", "Hon": "Honorable"}
_AFTER_NAMES = {"Jr": "Junior", "Sr": "Senior", "Co": "Company", "Inc": "Incorporated", "Ltd": "Limited",
                "Corp": "Corporation", "Bros": "Brothers", "Ave": "Avenue", "Rd": "Road", "Blvd": "Boulevard",
                "Ln": "Lane", "St": "Street", "Dr": "Drive", "Apt": "apartment", "vs": "versus",
                "etc": "et cetera", "approx": "approximately", "dept": "department", "e.g": "for example",
                "i.e": "that is", "est": "established", "min": "minutes", "max": "maximum"}
_BEFORE_NUMBERS = {"No": "number", "no": "number", "Nos": "numbers", "p": "page", "pp": "pages",
                   "Ch": "chapter", "ch": "chapter", "Fig": "figure", "Vol": "volume", "Sec": "section",
                   "Art": "article", "Ex": "exhibit", "Rm": "room", "Tel": "telephone", "tel": "telephone",
                   "Ext": "extension", "ext": "extension"}


def _abbreviation(m: re.Match[str], spot: Spot) -> str | None:
    if spot.lang == "zh":
        return None
    word, after = m[1], spot.text[m.end():]
    before = spot.text[:m.start()]
    if word in _BEFORE_NUMBERS and re.match(r"\s*[#\d]", after):
        return _BEFORE_NUMBERS[word]
    address = re.search(r"\d+(?:st|nd|rd|th)?\s+(?:[A-Z]\w*\s+){0,3}$", before)
    if word in _TITLES and word not in ("St", "Dr"):
        return _TITLES[word]
    # St. and Dr. are titles before a name, and Street and Drive after one.
    if word in _TITLES and re.match(r"\s+[A-Z]", after) and not address:
        return _TITLES[word]
    if word in _AFTER_NAMES:
        # The abbreviation's dot may also end the sentence.
        ends = not after.strip() or (re.match(r"\s+[A-Z]", after) and (word not in _TITLES or address))
        return _AFTER_NAMES[word] + ("." if ends else "")
    return None


def _dotted_letters(m: re.Match[str], spot: Spot) -> str:
    return readings_en.letters(m[0])


_CODE_EN = re.compile(
    r"\b(code|PIN|passcode|password|account|acct|extension|ext|zip|postcode|ID|reference|ref|confirmation"
    r"|order|ticket|card|policy|tracking|invoice|serial|room|flight|booking|dial|call|text|press|ending(\s+in)?)"
    r"\.?(\s+(number|no\.?|code|#))?\s*(is|was|:|#|=)?\s*$", re.IGNORECASE)
_CODE_ZH = re.compile(r"(码|号码|编号|卡号|账号|单号|尾号|工号|车次|航班|房间|密码|拨打|致电|电话|热线|邮编|分机)(是|为|:|：)?\s*$")
_YEAR_BEFORE = re.compile(
    r"\b(in|since|from|until|till|by|before|after|of|year|circa|around|during|early|late|mid|spring"
    r"|summer|autumn|fall|winter|to|through|and|Jan(uary)?|Feb(ruary)?|Mar(ch)?|Apr(il)?|May|June?|July?"
    r"|Aug(ust)?|Sep(t(ember)?)?|Oct(ober)?|Nov(ember)?|Dec(ember)?)\s+$", re.IGNORECASE)


def _number(m: re.Match[str], spot: Spot) -> str:
    """A bare number: a code, a year or a quantity, by its shape and context."""
    s, neg = m["amount"], m["neg"]
    before, after = spot.text[:m.start()][-40:], spot.text[m.end():]
    plain = s.isdigit()
    if plain and not neg:
        if len(s) > 1 and s[0] == "0":
            return spot.digits(s)
        if _is_year(s) and _YEAR_TAG.search(before):
            return str(spot.say.year(int(s)))
        if spot.lang == "zh":
            if (len(s) >= 7 and not s.endswith("000")) or (len(s) >= 3 and _CODE_ZH.search(before)):
                return spot.digits(s)
            if len(s) == 4 and after.startswith("年"):
                return readings_zh.year(int(s))
            if (s == "2" and after[:1] in readings_zh.LIANG_BEFORE and not before.endswith("第")
                    and not after.startswith("年级")):
                return "两"
        else:
            if len(s) >= 3 and _CODE_EN.search(before):
                return spot.digits(s)
            if len(s) >= 5 and not s.endswith("000"):
                return spot.digits(s)
            if _is_year(s) and (_YEAR_BEFORE.search(before) or re.match(r"\s*(AD|BC|BCE|CE)\b", after)):
                return readings_en.year(int(s))
    return _signed(neg, str(spot.say.number(s)), spot)


def _decade(m: re.Match[str], spot: Spot) -> str:
    if spot.lang == "zh":
        return (readings_zh.year(int(m[1])) if len(m[1]) == 4 else readings_zh.cardinal(int(m[1]))) + "年代"
    year = readings_en.year(int(m[1])) if len(m[1]) == 4 else readings_en.cardinal(int(m[1]))
    return year[:-1] + "ies" if year.endswith("y") else year + "s"


def _email(m: re.Match[str], spot: Spot) -> str:
    local, domain = m[0].split("@", 1)
    zh = spot.lang == "zh"
    names = {".": "点" if zh else "dot", "_": "下划线" if zh else "underscore", "-": "杠" if zh else "dash",
             "+": "加" if zh else "plus"}

    def read(part: str) -> str:
        return " ".join(names.get(t) or (spot.digits(t) if t.isdigit() else t)
                        for t in re.findall(r"[A-Za-z]+|\d+|[._+-]", part))

    return f"{read(local)} {'艾特' if zh else 'at'} {read(domain)}"


# The marks a URL is read with (its words and numbers are read as they are, its
# numbers digit by digit as in an e-mail address); the scheme is not said.
_URL_MARKS = {".": ("dot", "点"), "/": ("slash", "斜杠"), "?": ("question mark", "问号"), "=": ("equals", "等于"),
              "&": ("and", "和"), "-": ("dash", "杠"), "_": ("underscore", "下划线"), "#": ("hash", "井号"),
              "%": ("percent", "百分号"), "+": ("plus", "加"), "~": ("tilde", "波浪号"), ":": ("colon", "冒号"),
              "@": ("at", "艾特"), ",": ("comma", "逗号"), ";": ("semicolon", "分号"), "!": ("bang", "感叹号"),
              "*": ("star", "星号"), "$": ("dollar", "美元符号"), "(": ("open paren", "左括号"),
              ")": ("close paren", "右括号"), "'": ("quote", "引号")}


def _url(m: re.Match[str], spot: Spot) -> str:
    zh = spot.lang == "zh"
    words = []
    for t in re.findall(r"[A-Za-z]+|\d+|.", re.sub(r"^https?://", "", m[0]).rstrip("/")):
        if t in _URL_MARKS:
            words.append(_URL_MARKS[t][zh])
        else:
            words.append("w w w" if t == "www" else spot.digits(t) if t.isdigit() else t)
    return " ".join(words)


def _symbol(m: re.Match[str], spot: Spot) -> str:
    sym = m[0].strip()
    if spot.lang == "en" and sym in "#*":
        return "pound" if sym == "#" else "star"  # a phone keypad's keys, as IVR menus say them
    return str(spot.say.SYMBOLS[sym])


def _tag(m: re.Match[str], spot: Spot) -> str:
    return m[0]


def _rule(name: str, pattern: str, read: Reading) -> Rule:
    return Rule(name, re.compile(pattern), read)


_SCALE = r"(?:\s?(?P<scale>thousand|million|billion|trillion|bn|mn|k|K|M|B)(?![A-Za-z]))?"
_MONEY_PREFIX = (
    rf"(?P<neg>{_NEG})?(?:(?P<sign>US\$|HK\$|NT\$|[ACS]\$|[$€£¥￥₹₩₽])|(?P<code>USD|EUR|GBP|JPY|CNY|RMB|INR|HKD|AUD|CAD)\s?)"
    rf"\s?(?P<amount>{NUM})(?:\s?[-–~～]\s?(?P<upto>{NUM}))?{_SCALE}(?:\s?(?P<word>{_UNIT_WORD})(?![A-Za-z]))?"
)
_MONEY_SUFFIX = (
    rf"(?P<neg>{_NEG})?(?P<amount>{NUM})(?P<upto>)(?P<scale>)(?P<word>)\s?"
    r"(?:(?P<sign>[€£¢₽])|(?P<code>元|USD|EUR|GBP|JPY|CNY|RMB|INR|HKD|AUD|CAD)(?![A-Za-z]))"
)
_AP = r"(?P<{}>[AaPp])(?:\.\s?[Mm]\.|\s?[Mm])(?![A-Za-z])"

RULES: tuple[Rule, ...] = (
    _rule("tag", TAG.pattern, _tag),
    _rule("email", EMAIL, _email),
    _rule("url", URL, _url),
    _rule("date_iso", r"(?<![\d.-])(\d{4})-(\d{1,2})-(\d{1,2})(?![\d-])", _iso_date),
    _rule("date_numeric", r"(?<![\d/.])(\d{1,4})([/.])(\d{1,2})\2(\d{1,4})(?![\d/])", _numeric_date),
    _rule("version", r"(?<![A-Za-z0-9.])(?P<v>[vV](?=\d))?\d+(?:\.\d+)+(?![\d.]*\d)", _version),
    _rule("date_words", rf"(?<![A-Za-z])(?P<month>{_MONTH[1:-1]})\.?\s+(?P<day>\d{{1,2}})(?:st|nd|rd|th)?(?![\d:])"
                        r"(?:\s?[-–]\s?(?P<day2>\d{1,2})(?:st|nd|rd|th)?(?!\d))?(?:,?\s+(?P<year>\d{4})(?!\d))?",
          _written_date),
    _rule("date_words_day_first", rf"(?<![\d.])(?P<day>\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?(?P<month>{_MONTH[1:-1]})"
                                  r"(?![A-Za-z])(?P<dot>\.)?(?:,?\s+(?P<year>\d{4})(?!\d))?", _written_date_day_first),
    _rule("month_year", rf"(?<![A-Za-z]){_MONTH}\.?\s+(\d{{4}})(?!\d)", _month_year),
    _rule("time_range", rf"(?<![\d:.])(?P<h1>\d{{1,2}})(?:[:：](?P<m1>\d{{2}}))?\s?(?:{_AP.format('ap1')})?\s?"
                        rf"(?:[-–~～至到]|to)\s?(?P<h2>\d{{1,2}})(?:[:：](?P<m2>\d{{2}}))?\s?(?:{_AP.format('ap2')})?(?![\d:])",
          _time_range),
    _rule("time", rf"(?<![\d:.])(\d{{1,2}})[:：](\d{{2}})(?:[:：](\d{{2}}))?(?![\d:])(?:\s?{_MERIDIEM})?", _time),
    _rule("ratio", r"(?<![\d:.])(\d{1,3})[:：](\d)(?![\d:])", _ratio),
    _rule("hour_meridiem", rf"(?<![\d.:])(\d{{1,2}})\s?{_MERIDIEM}", _hour_meridiem),
    _rule("phone_intl", r"(?<![A-Za-z0-9+])(?P<country>\+\d{1,3})(?P<number>(?:[\s.-]?(?:\(\d{1,4}\)|\d{1,5})){2,6})(?!\d)",
          _phone),
    _rule("phone", r"(?<![A-Za-z0-9+])(?P<country>1(?=[\s.-]\d{3}[\s.-]))?[\s.-]?"
                   r"(?P<number>(?:\(\d{2,4}\)\s?|\d{2,4}[\s.-])(?:\d{3,4}[\s.-]\d{3,4}|\d{7,8}))(?!\d)", _phone),
    _rule("phone_short", r"(?<![A-Za-z0-9.,-])(?P<country>)(?P<number>(?:\d{3}|0\d{2,3})-\d{4})(?![\d-])", _phone),
    _rule("mobile_cn", r"(?<!\d)(?P<country>\+86)?\s?(?P<number>1[3-9]\d{9})(?!\d)", _phone),
    _rule("money_prefix", _MONEY_PREFIX, _money),
    _rule("money_suffix", _MONEY_SUFFIX, _money),
    _rule("temperature", rf"(?P<neg>{_NEG}|零下)?(?P<amount>{NUM})(?:\s?[-–~～至到]\s?(?P<neg2>[-−])?(?P<amount2>{NUM}))?"
                         r"\s?(?:°\s?(?P<scale>[CcFf])(?![A-Za-z])|(?P<sym>[℃℉]))", _temperature),
    _rule("percent_range", rf"({NUM})\s?[%％]?\s?(?:-|–|~|～|to|至|到)\s?({NUM})\s?[%％]", _percent_range),
    _rule("percent", rf"(?P<neg>{_NEG})?(?P<amount>{NUM})\s?[%％‰]", _percent),
    _rule("range", rf"(?<![A-Za-z0-9.,-])({NUM})\s?[-–~～]\s?({NUM})(?![\d.,]*\d)(?:\s?{_UNIT}(?![A-Za-z0-9²]))?", _range),
    _rule("unit", rf"(?P<neg>{_NEG})?(?P<amount>{NUM})\s?(?P<unit>{_UNIT[1:-1]})(?![A-Za-z0-9²/])(?:\.(?=\s+[a-z]))?",
          _unit),
    _rule("hours", rf"(?<![A-Za-z0-9.])({NUM})h(?![A-Za-z0-9])", _hours),
    _rule("ordinal", r"(?<![A-Za-z0-9])(\d+)(?:st|nd|rd|th)(?![A-Za-z])", _ordinal),
    _rule("fraction", r"(?<![A-Za-z0-9/.])(?:(?P<whole>\d+)\s)?(?P<num>\d+(?:\.\d+)?)/(?P<den>\d+)(?![\d/])", _fraction),
    _rule("per", r"/\s?(?P<per>mo|month|yr|year|wk|week|day|hr|hour|night|person|月|年|天|周|晚|人|次)(?![A-Za-z])", _per),
    _rule("hash_number", r"#\s?(\d+)", _hash_number),
    _rule("decade", r"(?<![A-Za-z0-9.])'?(\d{1,3}0)'?s(?![A-Za-z])", _decade),
    _rule("identifier", r"(?<![A-Za-z0-9])(?=[A-Za-z0-9-]*\d)(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9]+"
                        r"(?:-[A-Za-z0-9]+|\.\d+)*(?![A-Za-z0-9])", _identifier),
    _rule("abbreviation", r"(?<![A-Za-z.])(e\.g|i\.e|[A-Z][a-z]{0,3}|vs|etc|approx|dept|no|ch|pp?|est|ext|tel|min|max|ca)\.",
          _abbreviation),
    _rule("dotted_letters", r"(?<![A-Za-z.])(?:[A-Za-z]\.){2,}(?![A-Za-z])", _dotted_letters),
    _rule("number", rf"(?P<neg>{_NEG})?(?P<amount>{NUM})", _number),
    _rule("arithmetic", r"(?<=\d)\s?[*^]\s?(?=\d)", _arithmetic),
    _rule("symbol", r"[&@+=×§°≤≥]|[<>](?=\s?[\d$€£¥])|~(?=\s?\d)|#|(?<!\S)\*(?!\S)", _symbol),
)
