"""Reference token counts for the integration tests, from OpenAI's own
tokenizer rather than Iris's: prints the constants of `support::o200k`.

    python3 -m venv /tmp/tk && /tmp/tk/bin/pip install tiktoken==0.14.0
    /tmp/tk/bin/python tests/it/support/o200k_reference.py

tiktoken downloads o200k_base's vocabulary on first use; offline, put the
copy that the tiktoken-rs crate ships (assets/o200k_base.tiktoken, the same
file) in TIKTOKEN_CACHE_DIR under the name tiktoken gives it (the sha1 of its
URL): tiktoken checks the file against the sha256 it pins either way.

A chat prompt is counted as OpenAI's cookbook counts messages for gpt-4o
("How to count tokens with tiktoken"): 3 tokens per message, the tokens of
each of its values, 1 more for a `name`, and 3 priming the reply.
"""

import tiktoken

enc = tiktoken.get_encoding("o200k_base")


def tokens(text):
    return len(enc.encode_ordinary(text))


def prompt(messages):
    total = 3  # priming the reply
    for message in messages:
        total += 3
        for key, value in message.items():
            total += tokens(value)
            if key == "name":
                total += 1
    return total


def words(n):
    # The mock upstream's first n content chunks: "word0 word1 ... ".
    return tokens("".join(f"word{i} " for i in range(n)))


print("tiktoken", tiktoken.__version__)
print("SAY_HELLO", prompt([{"role": "user", "content": "Say hello"}]))
print(
    "TELL_ME",
    prompt([{"role": "user", "content": "Tell me, in as many words as you like, about tokenizers."}]),
)
print("WORDS", [words(n) for n in range(51)])
