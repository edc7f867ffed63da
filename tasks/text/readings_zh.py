"""Chinese readings of numbers and the things written with them.

cn2an reads the numbers (an2cn: cardinals, decimals, negatives). Its own
`transform` also guesses dates and percentages, but reads a mobile number as one
huge cardinal and leaves "15:30" and "-5℃" half done, so the categories are decided
by the rules and only the numbers are left to cn2an.
"""

from __future__ import annotations

import cn2an

_DIGITS = "零一二三四五六七八九"
# Renminbi is read in yuan, jiao and fen; other currencies as a decimal amount.
CURRENCIES = {"CNY": "元", "USD": "美元", "EUR": "欧元", "GBP": "英镑", "JPY": "日元", "INR": "卢比",
              "KRW": "韩元", "RUB": "卢布", "HKD": "港元", "AUD": "澳元", "CAD": "加元", "TWD": "新台币",
              "SGD": "新加坡元"}
UNITS = {
    "km": "公里", "m": "米", "cm": "厘米", "mm": "毫米", "kg": "公斤", "g": "克", "mg": "毫克", "ml": "毫升",
    "l": "升", "km/h": "公里每小时", "mph": "英里每小时", "kwh": "千瓦时", "kw": "千瓦", "w": "瓦", "v": "伏",
    "hz": "赫兹", "khz": "千赫兹", "mhz": "兆赫兹", "ghz": "吉赫兹", "ft": "英尺", "lb": "磅", "lbs": "磅",
    "oz": "盎司", "mi": "英里", "ms": "毫秒", "min": "分钟", "hr": "小时", "hrs": "小时", "sq ft": "平方英尺",
    "m2": "平方米", "m²": "平方米", "km2": "平方公里", "km²": "平方公里", "kb": "KB", "mb": "MB", "gb": "GB", "tb": "TB",
}
_SCALES = {"k": "千", "m": "百万", "mn": "百万", "bn": "十亿", "b": "十亿", "thousand": "千", "million": "百万",
           "billion": "十亿", "trillion": "万亿"}
SYMBOLS = {"&": "和", "+": "加", "=": "等于", "@": "艾特", "#": "井号", "*": "星号", "%": "百分号",
           "/": "斜杠", "°": "度", "§": "第", "×": "乘", "~": "约", "<": "小于",
           ">": "大于", "≤": "小于等于", "≥": "大于等于"}
# Measure words after which "2" is read 两 ("2个" is 两个, "12个" stays 十二个).
LIANG_BEFORE = set("个位次天件条本张只种名台辆点岁人家年周份层间套双对杯瓶碗部场门节块斤千万百亿倍")


def cardinal(n: int) -> str:
    return str(cn2an.an2cn(str(n), "low"))


def digits(s: str, yao: bool = False) -> str:
    table = _DIGITS.replace("一", "幺") if yao else _DIGITS
    return "".join(table[int(d)] for d in s if d.isdigit())


# cn2an reads integers up to 16 digits; longer ones are said digit by digit.
MAX_CARDINAL_DIGITS = 16


def number(s: str) -> str:
    s = s.replace(",", "").replace("−", "-").replace("–", "-").lstrip("+")
    sign = "负" if s.startswith("-") else ""
    whole, _, frac = s.lstrip("-").partition(".")
    words = digits(whole) if len(whole) > MAX_CARDINAL_DIGITS else str(cn2an.an2cn(whole or "0", "low"))
    # The decimals digit by digit here too: cn2an rounds past 16 significant digits.
    return sign + words + (f"点{digits(frac)}" if frac else "")


def ordinal(n: int) -> str:
    return "第" + cardinal(n)


def year(n: int) -> str:
    return digits(str(n))


def letters(s: str) -> str:
    return " ".join(c.upper() for c in s if c.isalpha())


def money(amount: str, currency: str, scale: str | None = None) -> str:
    amount = amount.replace(",", "")
    name = CURRENCIES[currency]
    if scale:
        return f"{number(amount)}{_SCALES[scale.lower()]}{name}"
    whole, _, frac = amount.partition(".")
    whole = whole or "0"
    if currency != "CNY" or len(frac) > 2 or not frac.strip("0") or len(whole) > MAX_CARDINAL_DIGITS:
        frac = frac.rstrip("0")
        return f"{number(whole + '.' + frac if frac else whole)}{name}"
    jiao, fen = int(frac[0]), int(frac[1]) if len(frac) > 1 else 0
    spoken = f"{cardinal(int(whole))}元" if int(whole) else ""
    if jiao:
        spoken += f"{_DIGITS[jiao]}角"
    elif spoken and fen:
        spoken += "零"
    if fen:
        spoken += f"{_DIGITS[fen]}分"
    return spoken


def percent(amount: str) -> str:
    amount = amount.replace("−", "-")
    sign = "负" if amount.startswith("-") else ""
    return f"{sign}百分之{number(amount.lstrip('-'))}"


def fraction(num: int, den: int) -> str:
    return f"{cardinal(den)}分之{cardinal(num)}"


def _hour(h: int) -> str:
    return "两" if h == 2 else cardinal(h)


def time_of_day(h: int, m: int, s: int | None, meridiem: str | None) -> str:
    prefix = ""
    if meridiem:
        prefix = "上午" if meridiem.lower().startswith("a") else "下午"
    spoken = f"{prefix}{_hour(h)}点"
    if m or s is not None:
        spoken += ("零" if 0 < m < 10 else "") + (cardinal(m) + "分" if m else "零分")
    if s is not None:
        spoken += f"{cardinal(s)}秒"
    return spoken


def date(y: int | None, m: int, d: int | None, day_first: bool) -> str:
    spoken = f"{year(y)}年" if y is not None else ""
    spoken += f"{cardinal(m)}月"
    return spoken + (f"{cardinal(d)}日" if d is not None else "")


def temperature(amount: str, scale: str) -> str:
    amount = amount.replace("−", "-")
    below = amount.startswith("-")
    name = "摄氏度" if scale == "C" else "华氏度"
    return f"{'零下' if below else ''}{number(amount.lstrip('-'))}{name}"


def unit(amount: str, symbol: str) -> str:
    name = UNITS[symbol.lower()]
    if name.isascii():
        name = " " + letters(name)
    return f"{'两' if amount == '2' else number(amount)}{name}"


def range_word() -> str:
    return "到"


def phone(groups: list[str], country: str | None, yao: bool = False) -> str:
    spoken = [f"加{digits(country, yao)}"] if country else []
    return "，".join(spoken + [digits(g, yao) for g in groups])


def month_name(m: int) -> str:
    return cardinal(m) + "月"
