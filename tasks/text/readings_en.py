"""English readings of numbers and the things written with them.

num2words reads the numbers (cardinals, ordinals, years); what it does not know is
how a phone number, a price with cents or a time of day is said, so that is here.
Hyphens and commas are left out of the words: ChatTTS turns "-" into a pause.
"""

from __future__ import annotations

import re

from num2words import num2words

_DIGITS = "zero one two three four five six seven eight nine".split()
_MONTHS = ("January February March April May June July August September October "
           "November December").split()
# (singular, plural) major unit, (singular, plural) minor unit or None.
CURRENCIES: dict[str, tuple[tuple[str, str], tuple[str, str] | None]] = {
    "USD": (("dollar", "dollars"), ("cent", "cents")),
    "EUR": (("euro", "euros"), ("cent", "cents")),
    "GBP": (("pound", "pounds"), ("penny", "pence")),
    "JPY": (("yen", "yen"), None),
    "CNY": (("yuan", "yuan"), None),
    "INR": (("rupee", "rupees"), ("paisa", "paise")),
    "KRW": (("won", "won"), None),
    "RUB": (("ruble", "rubles"), ("kopek", "kopeks")),
    "HKD": (("Hong Kong dollar", "Hong Kong dollars"), ("cent", "cents")),
    "AUD": (("Australian dollar", "Australian dollars"), ("cent", "cents")),
    "CAD": (("Canadian dollar", "Canadian dollars"), ("cent", "cents")),
    "TWD": (("New Taiwan dollar", "New Taiwan dollars"), None),
    "SGD": (("Singapore dollar", "Singapore dollars"), ("cent", "cents")),
}
UNITS: dict[str, tuple[str, str]] = {
    "km": ("kilometer", "kilometers"), "m": ("meter", "meters"), "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"), "kg": ("kilogram", "kilograms"), "g": ("gram", "grams"),
    "mg": ("milligram", "milligrams"), "ml": ("milliliter", "milliliters"), "l": ("liter", "liters"),
    "km/h": ("kilometer per hour", "kilometers per hour"), "mph": ("mile per hour", "miles per hour"),
    "kwh": ("kilowatt hour", "kilowatt hours"), "kw": ("kilowatt", "kilowatts"), "w": ("watt", "watts"),
    "v": ("volt", "volts"), "hz": ("hertz", "hertz"), "khz": ("kilohertz", "kilohertz"),
    "mhz": ("megahertz", "megahertz"), "ghz": ("gigahertz", "gigahertz"), "kb": ("kilobyte", "kilobytes"),
    "mb": ("megabyte", "megabytes"), "gb": ("gigabyte", "gigabytes"), "tb": ("terabyte", "terabytes"),
    "ft": ("foot", "feet"), "lb": ("pound", "pounds"), "lbs": ("pound", "pounds"), "oz": ("ounce", "ounces"),
    "mi": ("mile", "miles"), "ms": ("millisecond", "milliseconds"), "min": ("minute", "minutes"),
    "hr": ("hour", "hours"), "hrs": ("hour", "hours"), "sq ft": ("square foot", "square feet"),
    "m2": ("square meter", "square meters"), "m²": ("square meter", "square meters"),
    "km2": ("square kilometer", "square kilometers"), "km²": ("square kilometer", "square kilometers"),
}
SCALES = {"k": "thousand", "m": "million", "mn": "million", "bn": "billion", "b": "billion",
           "thousand": "thousand", "million": "million", "billion": "billion", "trillion": "trillion"}
SYMBOLS = {"&": "and", "+": "plus", "=": "equals", "@": "at", "#": "number", "*": "star", "%": "percent",
           "/": "slash", "°": "degrees", "§": "section", "×": "times", "~": "about", "<": "less than",
           ">": "more than", "≤": "at most", "≥": "at least"}


def _words(text: str) -> str:
    # "one thousand, two hundred and thirty-four" -> "one thousand two hundred thirty four"
    return re.sub(r"\band\s+", "", text.replace("-", " ").replace(",", ""))


def cardinal(n: int) -> str:
    return ("minus " if n < 0 else "") + _words(num2words(abs(n)))


def digits(s: str) -> str:
    return " ".join(_DIGITS[int(d)] for d in s if d.isdigit())


# Past this many digits nobody says the number as a cardinal (and num2words stops).
MAX_CARDINAL_DIGITS = 24


def number(s: str) -> str:
    """A written number: "-1,234.50" -> "minus one thousand two hundred thirty four point five zero"."""
    s = s.replace(",", "")
    sign = "minus " if s[:1] in "-−–" else ""
    whole, _, frac = s.lstrip("-−–+").partition(".")
    words = digits(whole) if len(whole) > MAX_CARDINAL_DIGITS else cardinal(int(whole or "0"))
    return sign + (f"{words} point {digits(frac)}" if frac else words)


def ordinal(n: int) -> str:
    return _words(num2words(n, to="ordinal"))


def year(n: int) -> str:
    return _words(num2words(n, to="year"))


def letters(s: str) -> str:
    return " ".join(c.upper() for c in s if c.isalpha())


def plural(amount: str, forms: tuple[str, str]) -> str:
    return forms[0] if amount.replace(",", "") in ("1", "-1") else forms[1]


def money(amount: str, currency: str, scale: str | None = None) -> str:
    major, minor = CURRENCIES[currency]
    amount = amount.replace(",", "")
    if scale:
        return f"{number(amount)} {SCALES[scale.lower()]} {major[1]}"
    whole, _, frac = amount.partition(".")
    whole = whole or "0"
    if minor is None or len(frac) > 2 or not frac or len(whole) > MAX_CARDINAL_DIGITS:
        unit = major[1] if frac else plural(whole, major)
        return f"{number(amount)} {unit}"
    cents = int(frac.ljust(2, "0"))
    parts = [f"{cardinal(int(whole))} {plural(whole, major)}"] if int(whole) or not cents else []
    if cents:
        parts.append(f"{cardinal(cents)} {plural(str(cents), minor)}")
    return " and ".join(parts)


def percent(amount: str) -> str:
    return f"{number(amount)} percent"


def fraction(num: int, den: int) -> str:
    names = {2: ("half", "halves"), 4: ("quarter", "quarters")}
    single = names.get(den, (ordinal(den), ordinal(den) + "s"))
    return f"{cardinal(num)} {single[0] if num == 1 else single[1]}"


def time_of_day(h: int, m: int, s: int | None, meridiem: str | None) -> str:
    seconds = f" and {cardinal(s)} {plural(str(s), ('second', 'seconds'))}" if s is not None else ""
    if meridiem:
        spoken = cardinal(h)
        if m or s is not None:
            spoken += " " + (f"oh {cardinal(m)}" if m < 10 else cardinal(m))
        return f"{spoken}{seconds} {letters(meridiem)}"
    if m == 0 and s is None:
        if h == 0:
            return "midnight"
        return f"{cardinal(h)} o clock" if h <= 12 else f"{cardinal(h)} hundred"
    return cardinal(h) + " " + (f"oh {cardinal(m)}" if m < 10 else cardinal(m)) + seconds


def date(y: int | None, m: int, d: int | None, day_first: bool) -> str:
    month = _MONTHS[m - 1]
    if d is None:
        spoken = month
    elif day_first:
        spoken = f"the {ordinal(d)} of {month}"
    else:
        spoken = f"{month} {ordinal(d)}"
    return f"{spoken}, {year(y)}" if y is not None else spoken


def temperature(amount: str, scale: str) -> str:
    name = "Celsius" if scale == "C" else "Fahrenheit"
    return f"{number(amount)} {plural(amount, ('degree', 'degrees'))} {name}"


def unit(amount: str, symbol: str) -> str:
    return f"{number(amount)} {plural(amount, UNITS[symbol.lower()])}"


def range_word() -> str:
    return "to"


def phone(groups: list[str], country: str | None) -> str:
    spoken = [f"plus {digits(country)}"] if country else []
    return ", ".join(spoken + [digits(g) for g in groups])


def month_name(m: int) -> str:
    return _MONTHS[m - 1]
