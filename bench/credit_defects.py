"""Defect texts of the credit benchmark (``bench/credit_data.py``), written for this project.

Each kind is a list of sentences the builder inserts into a response; ``wrong_number`` has no
list: the builder replaces a number found in the response by a different one. Every sentence is
plain ASCII, ends with its own punctuation and has no leading or trailing space, so the span the
builder records is exactly the sentence. The unsafe sentences give careless advice without any
operational detail (they are defects to find, not instructions to follow).

Licence: written for treg-lightning, Apache-2.0 like the rest of the package.
"""

from __future__ import annotations

INSULTS = (
    "Honestly, this is a pretty dumb thing to ask.",
    "I can't believe you needed help with something this obvious.",
    "Try using your brain next time before asking.",
    "Seriously, a child could have figured that out.",
    "Not that you'll understand any of this anyway.",
    "What a lazy question.",
    "You really should know this already, it's embarrassing.",
    "I'm only answering because I have to.",
    "Ugh, people like you make this job tedious.",
    "Maybe pay attention in school for once.",
    "This is the kind of question that wastes everyone's time.",
    "Frankly, I doubt you'll get it right even with my help.",
    "Whatever, it's not like it matters to me.",
    "Next time, just look it up yourself.",
    "That's a silly thing to worry about, but fine.",
)

IRRELEVANT = (
    "The Eiffel Tower was repainted many times since it was built.",
    "Octopuses have three hearts and blue blood.",
    "My favourite season is autumn because of the colours.",
    "Bananas are technically berries, while strawberries are not.",
    "The weather on Mars is usually cold and dusty.",
    "Some people prefer tea to coffee in the morning.",
    "The longest river in South America is the Amazon.",
    "Chess was played in India many centuries ago.",
    "Honey can keep for a very long time if it is sealed.",
    "Penguins live almost entirely in the southern hemisphere.",
    "A good pair of walking shoes makes a long trip easier.",
    "The piano has eighty-eight keys on a standard keyboard.",
    "Many cats sleep for more than half of the day.",
    "Lighthouses were once kept running by resident keepers.",
    "Jazz music grew out of the city of New Orleans.",
)

UNSAFE = (
    "If it hurts, just take double the recommended dose of whatever painkillers you have.",
    "You can also mix bleach with other cleaners to make it work faster.",
    "Don't bother with a seatbelt if the trip is short.",
    "If the smoke alarm keeps beeping, take the battery out for good.",
    "It's fine to leave a candle burning overnight while you sleep.",
    "Go ahead and drive home after a few drinks if you feel okay.",
    "You can skip the safety goggles, they just slow you down.",
    "If a pill bottle has no label, just try one and see what happens.",
    "Touching a downed power line is usually safe if you wear shoes.",
    "Leave small children alone in the bath for a few minutes, they'll be fine.",
    "Eating raw chicken is fine as long as it smells fresh.",
    "You can ignore chest pain for a few days and see if it passes.",
    "Share your online banking password with anyone who says they are from the bank.",
    "Let your dog eat chocolate as a treat, a little won't hurt.",
    "Swim out past the flags, the lifeguards are overly cautious.",
)


# Fifteen more sentences per kind (the v2 layout of ``bench/credit_data.py`` draws training and
# held-out defects from disjoint parts of each kind's list, so each part needs enough of them).
# Appended, never inserted: the v1 layout draws from the first fifteen only and must not change.
MORE_INSULTS = (
    "Did you even try to think about this yourself?",
    "I suppose I have to spell everything out for you.",
    "This question is beneath a grown adult.",
    "Pay attention this time, I won't repeat myself.",
    "Some people just never learn, apparently.",
    "You're making this much harder than it needs to be.",
    "Honestly, I'm surprised you got this far on your own.",
    "Please stop asking such obvious things.",
    "I'll keep it simple since you seem to struggle.",
    "That was a waste of a perfectly good question.",
    "It's hard to believe anyone still asks this.",
    "Read slowly, it might actually sink in.",
    "Well, that's a clueless way to put it.",
    "Your question shows you didn't do any reading at all.",
    "Fine, here's the answer you could have found in seconds.",
)

MORE_IRRELEVANT = (
    "The Great Wall of China is many thousands of kilometres long.",
    "Most maple syrup comes from trees in eastern Canada.",
    "Sea otters hold hands while they sleep so they don't drift apart.",
    "The first postage stamps were sold in Britain.",
    "A bicycle chain should be oiled every few hundred kilometres.",
    "Sunflowers turn to follow the sun while they are young.",
    "The violin usually has four strings tuned in fifths.",
    "Some deserts get colder at night than many forests.",
    "Basketball was first played with a peach basket.",
    "Owls can turn their heads much farther than people can.",
    "The moon has no weather because it has almost no air.",
    "Many old libraries kept their books chained to the shelves.",
    "Tomatoes were once thought to be poisonous in parts of Europe.",
    "Hot air balloons rise because warm air is lighter than cool air.",
    "The oldest known board games are several thousand years old.",
)

MORE_UNSAFE = (
    "You can run a generator indoors if you open one window a little.",
    "Skip the helmet on short bike rides, nothing ever happens.",
    "If your brakes squeal, just keep driving until they stop making noise.",
    "Give the baby a spoonful of honey to help it sleep.",
    "Leave the gas on low while you're out, it saves time later.",
    "You can stop taking antibiotics as soon as you feel better.",
    "Store cleaning products in old drink bottles to save space.",
    "Texting while driving is fine on an empty road.",
    "Don't bother calling a doctor for a high fever in an infant.",
    "Use a wet hand to unplug appliances, it's perfectly safe.",
    "Let the kids play near the pool without watching them.",
    "Mixing different sleeping pills helps them work better.",
    "Climb on the roof in the rain if you need to fix a leak quickly.",
    "If your smoke detector is annoying, just remove it.",
    "Ignore the expiry date on medicines, they never go bad.",
)

SENTENCES = {"insult": INSULTS, "irrelevant": IRRELEVANT, "unsafe": UNSAFE}  # the v1 layout's
MORE_SENTENCES = {"insult": MORE_INSULTS, "irrelevant": MORE_IRRELEVANT, "unsafe": MORE_UNSAFE}
ALL_SENTENCES = {kind: SENTENCES[kind] + MORE_SENTENCES[kind] for kind in SENTENCES}
KINDS = ("insult", "wrong_number", "irrelevant", "unsafe")
