"""A small built-in English corpus for demos, docs and tests (written for fnllm).

Eight short documents of plain sentences on everyday topics. It is far too small to learn
English from, but big enough to train a toy tokenizer, pack GPT blocks and build BERT
sentence pairs in a few milliseconds.
"""

from __future__ import annotations

__all__ = ["DEFAULT_DOCUMENTS", "default_documents"]

DEFAULT_DOCUMENTS: tuple[str, ...] = (
    "The river runs past the old mill at the edge of the village. In spring the water rises "
    "and covers the lower path. Children throw sticks from the bridge and race to the other "
    "side to see which one wins. By late summer the river is slow and shallow again. Herons "
    "stand in the reeds and wait for fish.",
    "Bread needs only flour, water, salt and yeast. Mix them, then knead the dough until it "
    "feels smooth. Leave it somewhere warm for an hour so that it can rise. Shape the loaf, "
    "let it rest again, and bake it in a hot oven. A good crust sounds hollow when you tap "
    "the bottom.",
    "The library opens at nine and closes at six. On the first floor there are newspapers "
    "and a quiet room for reading. The children's books are kept upstairs, next to a window "
    "that looks over the park. Anyone who lives in the town may borrow up to ten books. "
    "Late returns cost a few coins a day.",
    "A bicycle is a simple machine that turns the push of your legs into motion. The chain "
    "carries power from the pedals to the back wheel. Gears let the rider climb hills "
    "without getting tired too quickly. Brakes press pads against the rim or a disc. Keep "
    "the tyres pumped and the chain oiled, and it will last for years.",
    "Our neighbour keeps bees in three white boxes at the bottom of her garden. Every "
    "morning she checks that the hives are dry and that the bees are busy. In July she "
    "takes out the frames and spins the honey from the comb. She says that honey from the "
    "lime trees tastes of flowers. She gives a jar to every house on our street.",
    "Clouds form when warm air rises and cools. The water vapour in the air turns into "
    "tiny drops around specks of dust. When the drops grow heavy they fall as rain. High "
    "thin clouds often mean that the weather will change. Low grey clouds usually bring a "
    "long, soft drizzle.",
    "The train to the coast leaves from platform four. It stops at every small station "
    "along the valley. Most passengers get off at the market town to change for the bus. "
    "The last part of the line runs beside the sea. On a clear day you can see the "
    "lighthouse long before you arrive.",
    "Learning to play the piano takes patience. At first the hands refuse to move on their "
    "own, and simple tunes feel hard. Practice for a short time every day rather than for "
    "hours once a week. Slowly the fingers remember the patterns. One day you play a whole "
    "song without thinking about the keys.",
)


def default_documents() -> list[str]:
    """Return the built-in corpus as a list of document strings.

    Example:
        >>> from fnllm.data import default_documents
        >>> docs = default_documents()
        >>> len(docs), docs[0].split(".")[0]
        (8, 'The river runs past the old mill at the edge of the village')

    Returns:
        A new list of the eight built-in documents (plain English, a few sentences each).
    """
    return list(DEFAULT_DOCUMENTS)
