"""Field extraction task: a short sentence about a person or an order -> compact JSON.

Two record kinds, each with fixed keys that the prompt names in order::

    Extract the fields name, age, city from the text. Reply with compact JSON only.
    Text: Maria Lopez, aged 34, lives in Lisbon.

Answer: ``{"name":"Maria Lopez","age":34,"city":"Lisbon"}`` (numbers as JSON integers, no spaces,
keys in the listed order). Orders use keys ``order_id, item, quantity, city``. Scoring compares
parsed JSON, so key order and spacing in a prediction do not matter there.
"""

from __future__ import annotations

import json
import random

__all__ = ["ORDER_KEYS", "PERSON_KEYS", "generate"]

PERSON_KEYS = ("name", "age", "city")
ORDER_KEYS = ("order_id", "item", "quantity", "city")

_FIRST = [
    "Maria", "James", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Sofia", "Omar",
    "Emma", "Ravi", "Lena", "Diego", "Hana", "Noah", "Ines", "Tom", "Yara", "Ivan", "Nora", "Sam", "Mia",
]  # fmt: skip
_LAST = [
    "Lopez", "Smith", "Khan", "Tanaka", "Petrova", "Silva", "Haddad", "Murphy", "Wang", "Rossi", "Farah",
    "Brown", "Patel", "Berg", "Garcia", "Sato", "Miller", "Costa", "Novak", "Haas", "Kim", "Dubois",
]  # fmt: skip
_CITIES = [
    "Lisbon", "Oslo", "Berlin", "Madrid", "Toronto", "Nairobi", "Osaka", "Lima", "Dublin", "Prague",
    "Cairo", "Denver", "Vienna", "Seoul", "Austin", "Milan", "Porto", "Quito", "Leeds", "Perth",
]  # fmt: skip
_ITEMS = [
    "blue mug", "desk lamp", "USB cable", "notebook", "water bottle", "phone case", "wool scarf",
    "coffee beans", "yoga mat", "backpack", "tea kettle", "table fan", "pencil set", "rain jacket",
]  # fmt: skip

_PERSON_TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "Living in {city}, {name} is {age}.",
    "Meet {name} from {city}, who just turned {age}.",
    "{name} ({age}) moved to {city} last year.",
    "Our new member {name} is {age} and based in {city}.",
]
_ORDER_TEMPLATES = [
    "Order {order_id}: {quantity} x {item}, ship to {city}.",
    "Please send {quantity} x {item} to {city} under order {order_id}.",
    "Ship order #{order_id} to {city}: {item}, quantity {quantity}.",
    "Customer in {city} placed order {order_id} for {quantity} x {item}.",
    "Order number {order_id} contains {item} (qty {quantity}) for delivery in {city}.",
]


def _instruction(keys: tuple[str, ...]) -> str:
    return f"Extract the fields {', '.join(keys)} from the text. Reply with compact JSON only."


def _compact(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))


def generate(rng: random.Random) -> tuple[str, str]:
    """Draw one example: ``(prompt, answer)`` where answer is compact JSON with fixed keys."""
    if rng.random() < 0.5:
        record = {
            "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
            "age": rng.randint(18, 90),
            "city": rng.choice(_CITIES),
        }
        text, keys = rng.choice(_PERSON_TEMPLATES).format(**record), PERSON_KEYS
    else:
        record = {
            "order_id": rng.randint(1000, 9999),
            "item": rng.choice(_ITEMS),
            "quantity": rng.randint(1, 12),
            "city": rng.choice(_CITIES),
        }
        text, keys = rng.choice(_ORDER_TEMPLATES).format(**record), ORDER_KEYS
    return f"{_instruction(keys)}\nText: {text}", _compact(record)
