#!/usr/bin/env python3
# ruff: noqa: E501 (prompt texts are kept on one line each)
"""Write easyspec/distill/prompts/: the held-out chat prompts and the distillation prompt sets.

    python scripts/distill-prompts.py

heldout.jsonl     90 chat prompts, 18 in each of writing, qa, reasoning, summarization, coding
                  (hand-written; for measuring acceptance, never for training)
train-chat.jsonl  chat prompts for distillation, the same categories, from templates and word lists
train-code.jsonl  code openings continued as raw text (no chat template)

Deterministic: the same files every run. tests/test_distill.py checks that no
held-out prompt, or any ten-word stretch of one, appears in a training set.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "easyspec" / "distill" / "prompts"

HELD_OUT = {
    "writing": [
        "Write a short poem about the first snowfall in a quiet town.",
        "Write a cover letter for a junior data analyst position at a logistics company.",
        "Compose a friendly email inviting neighbours to a community garden clean-up on Saturday morning.",
        "Write a product description for a reusable stainless steel water bottle.",
        "Write the opening paragraph of a mystery novel set on a night train.",
        "Draft a thank-you note to a teacher who helped you prepare for an exam.",
        "Write a short story about a robot that learns to paint.",
        "Write a persuasive paragraph on why cities should plant more trees.",
        "Write a limerick about a cat who loves cardboard boxes.",
        "Write a toast for a best friend's wedding.",
        "Describe a bustling market in Marrakech using vivid sensory details.",
        "Write a motivational message for a team that just missed an important deadline.",
        "Write a sequence of four haiku, one for each season.",
        "Write the introduction of a blog post about learning to cook at the age of forty.",
        "Write a dialogue between a lighthouse keeper and a lost sailor.",
        "Write an apology email to a customer whose order arrived two weeks late.",
        "Write a short speech for a high school graduation ceremony.",
        "Write a fairy tale about a fox who guards a library.",
    ],
    "qa": [
        "What causes the seasons on Earth?",
        "How does a vaccine train the immune system?",
        "What is the difference between weather and climate?",
        "Who was Ada Lovelace and why is she remembered?",
        "How do bees make honey?",
        "What is inflation and how is it measured?",
        "Why is the sky blue?",
        "What is the function of mitochondria in a cell?",
        "How does a refrigerator keep food cold?",
        "What were the main causes of the French Revolution?",
        "What is photosynthesis?",
        "How do noise-cancelling headphones work?",
        "What is the difference between a virus and a bacterium?",
        "Why do we have leap years?",
        "What is machine learning?",
        "How does GPS determine your location?",
        "What is the greenhouse effect?",
        "What does the liver do in the human body?",
    ],
    "reasoning": [
        "A train leaves at 3:15 pm and the trip takes 2 hours and 50 minutes. When does it arrive? Explain.",
        "A farmer has 17 sheep and all but 9 run away. How many are left? Explain your reasoning.",
        "Tom is taller than Ann, and Ann is taller than Ben. Who is the shortest? Explain.",
        "A shirt costs $40 after a 20% discount. What was the original price? Show your steps.",
        "If it takes 5 machines 5 minutes to make 5 widgets, how long would 100 machines take to make 100 widgets?",
        "What is the next number in the sequence 2, 6, 12, 20, 30? Explain the pattern.",
        "A bat and a ball cost $1.10 in total. The bat costs $1.00 more than the ball. How much does the ball cost?",
        "You have a 3-litre jug and a 5-litre jug. How can you measure exactly 4 litres of water?",
        "All roses are flowers and some flowers fade quickly. Can we conclude that some roses fade quickly? Explain.",
        "A car travels 150 km in 2.5 hours. What is its average speed, and how far would it go in 4 hours?",
        "Sarah has twice as many apples as Mike. Together they have 27 apples. How many does each have?",
        "Which is heavier, a kilogram of feathers or a kilogram of iron? Explain.",
        "What is the angle between the hands of a clock at 3:00, and at 3:30?",
        "A bag holds 5 red, 3 blue and 2 green marbles. What is the probability of drawing a blue one?",
        "If today is Wednesday, what day of the week will it be 100 days from now? Explain.",
        "A rectangle has a perimeter of 30 cm and its length is twice its width. What is its area?",
        "Three friends split a bill of $84 plus a 15% tip equally. How much does each of them pay?",
        "Has it been proven that every even number greater than 2 is the sum of two primes? Explain what is known.",
    ],
    "summarization": [
        ("The first bicycles appeared in the early nineteenth century as wooden 'running machines' without pedals. "
         "Riders pushed themselves along with their feet. Pedals attached to the front wheel arrived in the 1860s, "
         "and the high-wheeled penny-farthing followed, fast but dangerous. The safety bicycle of the 1880s, with "
         "two equal wheels and a chain drive, made cycling practical for millions and helped win greater freedom "
         "of movement for women."),
        ("Coral reefs cover less than one percent of the ocean floor but shelter about a quarter of all marine "
         "species. When water stays too warm for too long, corals expel the algae that live in their tissues and "
         "feed them, turning white. This bleaching does not kill a coral at once, but if temperatures do not fall "
         "within weeks the coral starves. Repeated marine heatwaves have bleached large parts of many reefs in "
         "recent decades."),
        ("A two-year study of a software company compared employees who worked from home with colleagues who "
         "stayed in the office. Remote workers completed slightly more tasks and took fewer sick days, but they "
         "were promoted less often and reported feeling less connected to their teams. The authors suggest that "
         "companies offering remote work should make mentoring and recognition deliberate rather than leaving "
         "them to chance meetings in the corridor."),
        ("Around 1440 Johannes Gutenberg combined movable metal type, an oil-based ink and a screw press adapted "
         "from wine making. Books that had taken scribes months could now be printed in days. Within fifty years "
         "presses operated in more than two hundred European cities, prices fell, and ideas spread faster than "
         "any authority could control, which shaped the Reformation and the scientific revolution."),
        ("The city council voted seven to two on Tuesday to build protected bike lanes along Harbor Street and "
         "Fifth Avenue. The project will remove about eighty parking spaces and cost 3.2 million dollars, mostly "
         "covered by a state grant. Supporters cited a rise in cycling injuries, while several shop owners warned "
         "that losing parking could hurt business. Construction is planned to start next spring."),
        ("Sleep is not a passive state for the brain. During deep sleep, memories of the day are replayed and "
         "gradually moved from the hippocampus to long-term storage in the cortex. Experiments show that people "
         "who sleep after learning a list of words remember more of them than people who stay awake for the same "
         "time. Lack of sleep also makes it harder to form new memories the next day."),
        ("Tea was first drunk in China, where legend credits its discovery to an emperor nearly five thousand "
         "years ago. It spread to Japan with Buddhist monks and reached Europe in the seventeenth century through "
         "Dutch and Portuguese traders. In Britain it became so popular that the tea trade shaped colonial policy, "
         "and disputes over tea taxes contributed to the American Revolution."),
        ("In 1928 Alexander Fleming returned from holiday to find mould growing on one of his bacterial cultures. "
         "Around the mould the bacteria had died. He named the active substance penicillin, but purifying it "
         "proved difficult, and it was only in the early 1940s that a team in Oxford produced enough to treat "
         "patients. Mass production during the Second World War saved countless lives from infected wounds."),
        ("Honeybee colonies in many countries have suffered heavy losses in recent years. Researchers point to a "
         "combination of causes rather than a single one: parasitic mites that spread viruses, certain pesticides, "
         "poor nutrition where large fields grow a single crop, and changing weather. Because bees pollinate many "
         "fruits and vegetables, beekeepers and farmers are testing mite treatments and planting wildflower strips."),
        ("Northwind Tools reported revenue of 48 million dollars for the third quarter, up 12 percent from a year "
         "earlier, driven by strong sales of its cordless drills. Profit fell slightly because of higher shipping "
         "costs and a one-time expense for closing a warehouse. The company kept its forecast for the full year "
         "and announced plans to open a new distribution centre in Ohio."),
        ("On 20 July 1969 the lunar module Eagle landed in the Sea of Tranquility with less than a minute of fuel "
         "to spare. Neil Armstrong and Buzz Aldrin spent about two and a half hours outside, collecting rock "
         "samples and setting up experiments, while Michael Collins orbited above. Around six hundred million "
         "people watched the broadcast, and the crew returned safely to Earth four days later."),
        ("Microplastics are fragments smaller than five millimetres that come from broken-down packaging, "
         "synthetic clothing fibres and tyre wear. They have been found from Arctic ice to the deepest ocean "
         "trenches and inside fish, shellfish and drinking water. Scientists are still measuring the effects on "
         "health, but filters in washing machines and less single-use plastic are already being recommended."),
        ("Reading aloud to young children does more than entertain them. Studies find that children who are read "
         "to daily hear hundreds of thousands more words before starting school than those who are not. Shared "
         "reading builds vocabulary, attention and an understanding of how stories work, and the closeness of "
         "the routine helps children link books with comfort and pleasure."),
        ("Alexander Graham Bell received a patent for the telephone in March 1876, just hours before a rival "
         "inventor filed a similar claim. His device turned the vibrations of a voice into a varying electric "
         "current and back into sound. Within a decade thousands of homes and offices were connected, and the "
         "company he helped found grew into one of the largest businesses in the world."),
        ("Mount Kelda, a volcano in the northern highlands, erupted early on Sunday, sending ash four kilometres "
         "into the air. Authorities evacuated two villages and closed the regional airport as a precaution. No "
         "injuries have been reported. Scientists said lava is flowing slowly down the uninhabited eastern slope "
         "and that further, smaller eruptions are likely over the coming week."),
        ("As electric cars age, millions of large lithium-ion batteries will reach the end of their life. Many "
         "still hold most of their capacity and can serve for years storing solar power for buildings. When they "
         "can no longer be reused, recycling plants shred them and recover lithium, cobalt and nickel, which "
         "reduces the need for new mining, although the process remains expensive."),
        ("The Silk Road was not a single road but a network of trade routes linking China with Central Asia, "
         "Persia and the Mediterranean for more than a thousand years. Merchants carried silk, spices, glass and "
         "precious metals, but the routes also spread religions, technologies such as papermaking, and diseases, "
         "including the plague that devastated Europe in the fourteenth century."),
        ("From the first of next month the central library will open at eight in the morning on weekdays, an "
         "hour earlier than now, and stay open until nine on Thursdays. Sunday opening will end because few "
         "visitors came. The changes follow a survey of 1,200 residents, most of whom asked for longer hours "
         "before work. The children's reading room keeps its current schedule."),
    ],
    "coding": [
        "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
        "Write a Python function that returns the n-th Fibonacci number without recursion.",
        ("Write a SQL query that finds the five customers with the largest total order amount, given tables "
         "customers(id, name) and orders(id, customer_id, amount)."),
        ("Explain what this Python code does and fix the bug:\n\ndef average(xs):\n    total = 0\n    for x in xs:\n"
         "        total += x\n    return total / len(x)"),
        "Write a JavaScript function that debounces another function.",
        "Write a Python class for a stack with push, pop and peek methods.",
        "Write a bash command that counts the lines in all .py files under a directory.",
        "Write a Python function that merges two sorted lists into one sorted list.",
        "Write a Python script that reads a CSV file and prints the average of its 'price' column.",
        "Implement binary search in Python and explain its time complexity.",
        "Write a regular expression that matches a simple email address, and explain each part.",
        "Write a Python function that counts word frequencies in a text and returns the ten most common words.",
        "Write a C function that reverses a string in place.",
        "Write a Python decorator that measures and prints how long a function call takes.",
        "What is the difference between a list and a tuple in Python? Give examples.",
        "Write a Python function that flattens a nested list of any depth.",
        "Write pytest unit tests for a function add(a, b) that adds two numbers.",
        "Write a Rust function that returns the largest element of a slice of integers.",
    ],
}

SUMMARY_INSTRUCTIONS_HELD_OUT = "Summarize the following text in two sentences.\n\n"

# --- training prompts ------------------------------------------------------------------------------------------

WRITING_FORMS = [
    "Write a short poem about {}.", "Write a very short story about {}.", "Write three haiku about {}.",
    "Write a limerick about {}.", "Write a diary entry from the point of view of {}.",
    "Describe {} in a vivid paragraph.", "Write a children's bedtime story about {}.",
    "Write the first lines of a novel that begins with {}.",
]
WRITING_SUBJECTS = [
    "an old oak tree", "a city waking up at dawn", "a forgotten umbrella", "the ocean at night",
    "a grandmother's kitchen", "a dragon who is afraid of heights", "the last day of summer", "a busy airport",
    "a lost key", "a mountain village in winter", "an unlikely friendship", "a thunderstorm over the plains",
    "a street musician", "a garden in spring", "a game of chess in the park", "a rainy Monday morning",
    "a clockmaker's workshop", "a whale singing in the deep", "a small bakery at four in the morning",
    "a river that changes course", "a scientist's first discovery", "a snail's long journey",
    "an empty stadium", "a message in a bottle", "a desert at noon", "the smell of fresh bread",
    "a penguin who wants to fly", "an astronaut looking back at Earth", "a village festival", "a broken violin",
]
WRITING_LETTERS = [
    "Write an email to {} about {}.",
    "Write a short, polite letter to {} about {}.",
]
RECIPIENTS = ["your landlord", "a new colleague", "your manager", "a local newspaper", "the school principal",
              "a hotel's front desk", "an old friend", "a customer service team"]
LETTER_TOPICS = ["a broken heating system", "a proposal to start a book club", "a request for a day off",
                 "the noise from a construction site", "a field trip next month", "a reservation for next weekend",
                 "meeting up after many years", "a faulty pair of headphones", "feedback on a recent workshop"]
ADS = ["a solar-powered phone charger", "a handmade ceramic mug", "a folding electric scooter",
       "a language-learning app", "an ergonomic office chair", "a set of bamboo kitchen utensils",
       "a waterproof hiking backpack", "a smart thermostat"]

QA_TEMPLATES = ["What is {}?", "Explain {} in simple terms.", "How does {} work?", "Why is {} important?"]
QA_TOPICS = [
    "a black hole", "DNA", "the stock market", "an earthquake", "the water cycle", "democracy", "a rainbow",
    "a solar panel", "the internet", "a credit score", "gravity", "an electric motor", "compound interest",
    "a tsunami", "natural selection", "supply and demand", "a hurricane", "a nuclear power plant",
    "a microwave oven", "blood pressure", "an atom", "a jet engine", "the tides", "the ozone layer", "a battery",
    "an encryption key", "a search engine", "the Pythagorean theorem", "a telescope", "the circulatory system",
    "a central bank", "plate tectonics", "a wind turbine", "the placebo effect", "an operating system",
    "a calorie", "radioactivity", "the Renaissance", "a hybrid car", "the human eye",
]
QA_WHY = [
    "Why do cats purr?", "Why does ice float on water?", "Why do onions make people cry?",
    "Why do leaves change colour in autumn?", "Why does bread go stale?", "Why do we yawn?",
    "Why is the ocean salty?", "Why do stars twinkle?", "Why do some people need glasses?",
    "Why does the Moon have phases?", "Why do birds migrate?", "Why do metals conduct electricity?",
    "Who was Marie Curie?", "Who invented the printing of paper money?", "Who were the Vikings?",
    "Who was Nikola Tesla?", "When did the Roman Empire fall, and why?", "Where is the Great Rift Valley?",
]

SUMMARY_INSTRUCTIONS = [
    "Summarize this in one sentence:\n\n{}", "Give three bullet points that capture the main ideas:\n\n{}",
    "TL;DR:\n\n{}", "Write a short summary for a busy reader:\n\n{}",
]
PASSAGES = [
    ("Chocolate began as a bitter drink of the Maya and Aztecs, flavoured with chilli and valued so highly that "
     "cacao beans served as money. Spanish explorers brought it to Europe, where sugar was added, and in the "
     "nineteenth century new machines pressed out cocoa butter and made the first solid chocolate bars."),
    ("Wind turbines turn the energy of moving air into electricity. Modern turbines stand over a hundred metres "
     "tall, and their blades turn a generator through a gearbox. Offshore wind farms benefit from stronger, "
     "steadier winds, although they cost more to build and maintain than turbines on land."),
    ("The Romans built aqueducts to carry fresh water from distant springs into their cities. Using only gravity, "
     "the channels dropped by a few centimetres per hundred metres over many kilometres. Some aqueducts crossed "
     "valleys on tall stone arches, and a few still carry water today."),
    ("The human heart beats about one hundred thousand times a day. Its right side pumps blood to the lungs to "
     "pick up oxygen, while the stronger left side pushes oxygen-rich blood around the body. Valves keep the flow "
     "moving in one direction, and an electrical signal sets the rhythm."),
    ("Monarch butterflies in North America make one of the longest insect migrations, flying up to four thousand "
     "kilometres to forests in central Mexico. No single butterfly completes the round trip; it takes several "
     "generations, yet each autumn the new generation finds the same mountain forests."),
    ("Urban gardening has grown in popularity as city residents turn rooftops, balconies and empty lots into "
     "places to grow vegetables. Supporters say it provides fresh food, cools neighbourhoods and brings neighbours "
     "together, while critics note that soil in former industrial areas must be tested for contamination."),
    ("The internet grew out of ARPANET, a research network funded by the United States government in the late "
     "1960s. Its key idea was packet switching: messages are broken into small packets that travel independently "
     "and are reassembled at their destination. The World Wide Web, invented in 1989, made it easy to use."),
    ("Origami, the art of folding paper, developed in Japan where paper was once too precious for play and was "
     "folded for religious ceremonies. Today mathematicians study folding patterns, and engineers use them to "
     "pack solar panels for satellites and to design medical stents that unfold inside the body."),
    ("The modern Olympic Games were revived in Athens in 1896 by Pierre de Coubertin, who hoped sport would "
     "promote peace between nations. Only fourteen countries took part. Today more than two hundred send athletes, "
     "and the Winter Games, added in 1924, feature sports played on snow and ice."),
    ("Glaciers store about two thirds of the world's fresh water. As temperatures rise, most of them are "
     "shrinking, which first increases the water in rivers that depend on them and later reduces it. Melting "
     "glaciers also contribute to rising sea levels and can form unstable lakes that threaten valleys below."),
    ("Sourdough bread rises without commercial yeast. Bakers keep a starter, a mixture of flour and water in "
     "which wild yeasts and lactic acid bacteria live together. The bacteria give the bread its sour taste, and "
     "the slow fermentation makes the loaf keep fresh for longer."),
    ("Bacteria can become resistant to antibiotics when the drugs are overused. Each course of treatment kills "
     "the sensitive bacteria and leaves the hardiest behind to multiply. Health agencies urge doctors to prescribe "
     "antibiotics only when needed and ask patients to finish the full course."),
    ("3D printers build objects layer by layer from plastic, metal or even concrete, following a digital model. "
     "They let engineers test designs within hours instead of weeks, and hospitals print custom implants, "
     "although printing large numbers of identical parts is still slower than traditional manufacturing."),
    ("A total solar eclipse happens when the Moon passes directly between the Sun and Earth and covers the "
     "Sun's bright disc. For a few minutes the sky darkens, the temperature drops and the Sun's outer atmosphere, "
     "the corona, becomes visible. Any one place sees a total eclipse only every few centuries on average."),
    ("Jazz was born in New Orleans in the early twentieth century from a mix of blues, ragtime and brass band "
     "music. Improvisation is at its heart: musicians invent melodies on the spot over a shared pattern of chords. "
     "From there jazz spread to Chicago and New York and influenced almost every later style of popular music."),
    ("Desalination plants turn sea water into drinking water, usually by pushing it through membranes that hold "
     "back salt. The method supplies much of the water in several dry countries, but it uses a lot of energy and "
     "returns very salty brine to the sea, which can harm marine life near the outlet."),
    ("The town of Brookfield will switch its street lights to LED lamps over the next two years. Officials expect "
     "the change to cut the lighting bill by half and reduce maintenance, since the new lamps last about four "
     "times longer. Residents will be able to request dimmer lights on quiet residential streets."),
    ("Deep-sea exploration remains difficult because of crushing pressure, total darkness and cold. Remotely "
     "operated vehicles now carry cameras and robotic arms thousands of metres down, and each expedition finds "
     "new species, from glowing jellyfish to worms that live near volcanic vents."),
    ("The Renaissance began in Italian cities in the fourteenth century, when scholars rediscovered classical "
     "Greek and Roman texts. Wealthy families such as the Medici paid artists like Leonardo and Michelangelo, "
     "and new ideas about perspective, anatomy and human potential spread across Europe."),
    ("Public libraries in many countries now lend far more than books. Members can borrow laptops, tools, "
     "musical instruments and even seeds for their gardens, and many branches run coding clubs and job-search "
     "workshops. Librarians say the goal is the same as ever: giving everyone access to resources."),
    ("Regular physical activity lowers the risk of heart disease, diabetes and depression. Health guidelines "
     "recommend at least 150 minutes of moderate exercise each week, such as brisk walking or cycling, plus "
     "muscle-strengthening activities twice a week. Even short bouts of movement bring measurable benefits."),
    ("The kakapo is a large, flightless parrot from New Zealand that nearly went extinct after cats and rats "
     "arrived on its islands. By the 1990s only about fifty birds were left. A programme that moved them to "
     "predator-free islands and monitors every nest has slowly brought the number back above two hundred."),
    ("Bamboo is among the fastest-growing plants on Earth; some species grow almost a metre a day. It is strong "
     "enough to build houses and scaffolding, and it regrows after cutting without replanting, which is why "
     "designers promote it as a renewable material for furniture and flooring."),
    ("The Harbor Street bakery announced it will close its doors at the end of the year after sixty years in "
     "business. The owners, who are retiring, said they could not find a buyer willing to keep the old wood-fired "
     "oven. Regular customers have organised a farewell party for the last Saturday in December."),
]

CODE_TASKS = [
    "removes duplicates from a list while keeping the original order", "computes the factorial of n",
    "checks whether a number is prime", "converts a temperature from Celsius to Fahrenheit",
    "finds the longest word in a sentence", "transposes a matrix given as a list of rows",
    "rotates an array to the right by k positions", "computes the greatest common divisor of two integers",
    "parses a URL query string into a dictionary", "returns the second largest number in a list",
    "counts the vowels in a string", "checks whether two strings are anagrams",
    "converts a Roman numeral to an integer", "sums the digits of a positive integer",
    "splits a list into chunks of size n", "capitalizes the first letter of every word",
    "computes the running average of a stream of numbers", "validates that parentheses are balanced",
    "converts a decimal number to binary", "finds all pairs in a list that add up to a target",
]
CODE_LANGUAGES = ["Python", "JavaScript", "Go", "Java", "C++", "TypeScript"]
CODE_QUESTIONS = [
    "What is the difference between a set and a list in Python?",
    "Explain what a generator is in Python and when to use one.",
    "What is the difference between == and is in Python?",
    "Explain the difference between a shallow copy and a deep copy.",
    "What does the async keyword do in JavaScript?",
    "Explain what a closure is, with a short example.",
    "What is a race condition and how can it be avoided?",
    "Explain Big O notation with examples.",
    "What is the difference between a process and a thread?",
    "What is recursion? Give a simple example.",
    "Explain what an API is to a beginner.",
    "What does git rebase do, and how is it different from git merge?",
]

CODE_OPENINGS = [
    'def celsius_to_kelvin(celsius: float) -> float:\n    """Convert a temperature in degrees Celsius to kelvin."""',
    'def is_leap_year(year: int) -> bool:\n    """Return True if `year` is a leap year in the Gregorian calendar."""',
    'def chunked(items, size):\n    """Yield successive lists of `size` items from `items`."""',
    'def read_lines(path):\n    """Return the non-empty lines of a text file, stripped of whitespace."""',
    'def slugify(text: str) -> str:\n    """Turn a title into a URL slug: lowercase words joined by hyphens."""',
    'def median(values: list[float]) -> float:\n    """Return the median of a non-empty list of numbers."""',
    'def word_count(text: str) -> dict[str, int]:\n    """Count how often each word occurs, ignoring case."""',
    'def safe_divide(a: float, b: float, default: float = 0.0) -> float:\n    """Divide a by b, returning `default` when b is zero."""',
    'def unique_sorted(items):\n    """Return the distinct items in ascending order."""',
    'def parse_duration(text: str) -> int:\n    """Parse a duration like "1h30m" or "45s" into seconds."""',
    'def clamp(value, low, high):\n    """Limit `value` to the closed interval [low, high]."""',
    'def dot(a: list[float], b: list[float]) -> float:\n    """Dot product of two vectors of equal length."""',
    'def load_json(path):\n    """Read a JSON file and return the parsed object."""',
    'def retry(times: int):\n    """Decorator: call the function again up to `times` times when it raises."""',
    'def group_by(items, key):\n    """Group items into a dict of lists by the value of key(item)."""',
    'def moving_average(values, window):\n    """Return the averages of each run of `window` consecutive values."""',
    'def is_valid_ipv4(address: str) -> bool:\n    """Check that `address` is four numbers from 0 to 255 separated by dots."""',
    'def hamming_distance(a: str, b: str) -> int:\n    """Number of positions at which two equal-length strings differ."""',
    'def to_snake_case(name: str) -> str:\n    """Convert CamelCase to snake_case."""',
    'def primes_below(n: int) -> list[int]:\n    """All prime numbers smaller than n, by the sieve of Eratosthenes."""',
    'def invert_dict(mapping: dict) -> dict:\n    """Swap keys and values; values must be hashable."""',
    'def pairwise_sums(numbers):\n    """Return the sums of each pair of neighbouring numbers."""',
    'def format_bytes(size: int) -> str:\n    """Human-readable size: 1536 -> "1.5 KiB"."""',
    'def matrix_multiply(a, b):\n    """Multiply two matrices given as lists of rows."""',
    'class Counter:\n    """A counter that can be incremented, decremented and reset."""\n\n    def __init__(self, start: int = 0):',
    'class Rectangle:\n    """An axis-aligned rectangle with width and height."""\n\n    def __init__(self, width, height):',
    'class TodoList:\n    """A list of tasks that can be added, completed and listed."""\n\n    def __init__(self):',
    'class BankAccount:\n    """A bank account with deposits, withdrawals and a balance."""\n\n    def __init__(self, owner):',
    'class LRUCache:\n    """A fixed-size cache that evicts the least recently used entry."""\n\n    def __init__(self, capacity: int):',
    'class Vector2:\n    """A two-dimensional vector supporting addition and scaling."""\n\n    def __init__(self, x: float, y: float):',
    'class Timer:\n    """Context manager that measures the time spent in its block."""\n\n    def __enter__(self):',
    'class Queue:\n    """A first-in first-out queue built on two stacks."""\n\n    def __init__(self):',
    'import argparse\n\n\ndef main():\n    parser = argparse.ArgumentParser(description="Resize every image in a folder.")',
    'import csv\n\n\ndef total_sales(path):\n    """Sum the "amount" column of a CSV file of sales."""',
    'import random\n\n\ndef shuffle_deck():\n    """Return a shuffled deck of 52 playing cards as strings like "Q♠"."""',
    'import os\n\n\ndef largest_files(folder, n=10):\n    """The n largest files under `folder`, with their sizes."""',
    'function capitalize(word) {\n  // Return the word with its first letter in upper case.',
    'function sumArray(numbers) {\n  // Add up all numbers in the array.',
    'function uniqueValues(array) {\n  // Return the distinct values of the array in their first order.',
    'function formatDate(date) {\n  // Format a Date as YYYY-MM-DD.',
    'const fetchJson = async (url) => {\n  // Fetch a URL and parse the response body as JSON.',
    'function range(start, end, step = 1) {\n  // Return an array of numbers from start up to, not including, end.',
    'func Reverse(s string) string {\n\t// Reverse returns s with its runes in reverse order.',
    'func Max(values []int) (int, error) {\n\t// Max returns the largest value, or an error for an empty slice.',
    'public static int countWords(String text) {\n    // Count the words separated by whitespace.',
    'fn mean(values: &[f64]) -> Option<f64> {\n    // The arithmetic mean, or None for an empty slice.',
    'SELECT department, COUNT(*) AS employees\nFROM staff\n-- only departments with more than ten people',
    '#include <stdio.h>\n\n/* Print the multiplication table from 1 to 10. */\nint main(void) {',
]

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Luis"]
THINGS = ["pencils", "notebooks", "oranges", "tickets", "stamps", "bottles of juice", "plants", "cookies"]


def reasoning_prompts(rng: random.Random) -> list[str]:
    out: list[str] = []
    for _ in range(14):
        price, count, thing = rng.randint(2, 9), rng.randint(3, 12), rng.choice(THINGS)
        out.append(f"One of the {thing} costs ${price}. How much do {count} of them cost, and how much change is "
                   f"left from ${price * count + rng.randint(1, 20)}? Explain.")
    for _ in range(10):
        a, b, d = rng.randint(2, 6), rng.randint(7, 12), rng.randint(6, 20)
        out.append(f"If {a} workers can paint a fence in {d} days, how long would {b} workers need, working at "
                   "the same rate? Show your reasoning.")
    for _ in range(10):
        p, y = rng.choice([5, 10, 15, 25, 30, 40, 60, 75]), rng.randint(2, 40) * 10
        out.append(f"What is {p}% of {y}? Show the steps.")
    for _ in range(10):
        v, t = rng.randint(40, 120), rng.choice([1.5, 2, 3, 4.5, 5])
        out.append(f"A bus drives at {v} km/h for {t} hours. How far does it travel? Explain.")
    for _ in range(10):
        a, b, c = rng.sample(NAMES, 3)
        out.append(f"{a} is older than {b}, and {c} is younger than {b}. Who is the oldest and who is the "
                   "youngest? Explain.")
    for _ in range(8):
        start, step = rng.randint(1, 9), rng.randint(2, 7)
        seq = ", ".join(str(start + step * i) for i in range(5))
        out.append(f"What comes next in {seq}? Explain the rule.")
    for _ in range(8):
        age, gap, later = rng.randint(20, 50), rng.randint(2, 12), rng.randint(3, 15)
        out.append(f"{rng.choice(NAMES)} is {age} years old and her brother is {gap} years younger. How old "
                   f"will the brother be in {later} years?")
    return list(dict.fromkeys(out))


def train_chat(rng: random.Random) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for subject in WRITING_SUBJECTS:
        rows.append(("writing", rng.choice(WRITING_FORMS).format(subject)))
    for recipient in RECIPIENTS:
        for topic in rng.sample(LETTER_TOPICS, 3):
            rows.append(("writing", rng.choice(WRITING_LETTERS).format(recipient, topic)))
    for product in ADS:
        rows.append(("writing", f"Write a catchy advertisement for {product}."))
    for topic in QA_TOPICS:
        rows.append(("qa", rng.choice(QA_TEMPLATES).format(topic)))
    rows += [("qa", q) for q in QA_WHY]
    rows += [("reasoning", q) for q in reasoning_prompts(rng)]
    for passage in PASSAGES:
        for instruction in rng.sample(SUMMARY_INSTRUCTIONS, 2):
            rows.append(("summarization", instruction.format(passage)))
    for task in CODE_TASKS:
        for language in rng.sample(CODE_LANGUAGES, 2):
            rows.append(("coding", f"Write a {language} function that {task}."))
    rows += [("coding", q) for q in CODE_QUESTIONS]
    return rows


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    lines = [json.dumps({"question_id": i, "category": c, "turns": [t]}, ensure_ascii=False)
             for i, (c, t) in enumerate(rows, start=1)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(rows)} prompts to {path}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    held_out = [(c, SUMMARY_INSTRUCTIONS_HELD_OUT + t if c == "summarization" else t)
                for c, texts in HELD_OUT.items() for t in texts]
    write(OUT / "heldout.jsonl", held_out)
    write(OUT / "train-chat.jsonl", train_chat(random.Random(0)))
    write(OUT / "train-code.jsonl", [("completion", t) for t in CODE_OPENINGS])


if __name__ == "__main__":
    main()
