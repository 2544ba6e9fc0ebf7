"""MovieLens-100k-like items and users rendered with the real renderers: export parity probes and the benchmark.

Titles, years and genres are real MovieLens-100k movies; users, histories and counters are drawn at
random (seeded), with 30-60 engaged movies per user as in the benchmark's brief.
"""

from __future__ import annotations

import random

from models.render import Value

MOVIES: list[tuple[str, int, str]] = [
    ("Toy Story", 1995, "Animation|Children's|Comedy"),
    ("GoldenEye", 1995, "Action|Adventure|Thriller"),
    ("Four Rooms", 1995, "Thriller"),
    ("Get Shorty", 1995, "Action|Comedy|Drama"),
    ("Copycat", 1995, "Crime|Drama|Thriller"),
    ("Shanghai Triad (Yao a yao yao dao waipo qiao)", 1995, "Drama"),
    ("Twelve Monkeys", 1995, "Drama|Sci-Fi"),
    ("Babe", 1995, "Children's|Comedy|Drama"),
    ("Dead Man Walking", 1995, "Drama"),
    ("Richard III", 1995, "Drama|War"),
    ("Seven (Se7en)", 1995, "Crime|Thriller"),
    ("Usual Suspects, The", 1995, "Crime|Thriller"),
    ("Mighty Aphrodite", 1995, "Comedy"),
    ("Postino, Il", 1994, "Drama|Romance"),
    ("Mr. Holland's Opus", 1995, "Drama"),
    ("French Twist (Gazon maudit)", 1995, "Comedy|Romance"),
    ("From Dusk Till Dawn", 1996, "Action|Comedy|Crime|Horror|Thriller"),
    ("White Balloon, The", 1995, "Drama"),
    ("Antonia's Line", 1995, "Drama"),
    ("Angels and Insects", 1995, "Drama|Romance"),
    ("Muppet Treasure Island", 1996, "Action|Adventure|Comedy|Musical|Thriller"),
    ("Braveheart", 1995, "Action|Drama|War"),
    ("Taxi Driver", 1976, "Drama|Thriller"),
    ("Rumble in the Bronx", 1995, "Action|Adventure|Crime"),
    ("Birdcage, The", 1996, "Comedy"),
    ("Brothers McMullen, The", 1995, "Comedy"),
    ("Bad Boys", 1995, "Action"),
    ("Apollo 13", 1995, "Action|Drama|Thriller"),
    ("Batman Forever", 1995, "Action|Adventure|Comedy|Crime"),
    ("Belle de jour", 1967, "Drama"),
    ("Crimson Tide", 1995, "Drama|Thriller|War"),
    ("Crumb", 1994, "Documentary"),
    ("Desperado", 1995, "Action|Romance|Thriller"),
    ("Doom Generation, The", 1995, "Comedy|Drama"),
    ("Free Willy 2: The Adventure Home", 1995, "Adventure|Children's|Drama"),
    ("Mad Love", 1995, "Drama|Romance"),
    ("Nadja", 1994, "Drama"),
    ("Net, The", 1995, "Sci-Fi|Thriller"),
    ("Strange Days", 1995, "Action|Crime|Sci-Fi"),
    ("To Wong Foo, Thanks for Everything! Julie Newmar", 1995, "Comedy"),
    ("Billy Madison", 1995, "Comedy"),
    ("Clerks", 1994, "Comedy"),
    ("Disclosure", 1994, "Drama|Thriller"),
    ("Dolores Claiborne", 1994, "Drama|Thriller"),
    ("Eat Drink Man Woman", 1994, "Comedy|Drama"),
    ("Exotica", 1994, "Drama"),
    ("Ed Wood", 1994, "Comedy|Drama"),
    ("Hoop Dreams", 1994, "Documentary"),
    ("I.Q.", 1994, "Comedy|Romance"),
    ("Star Wars", 1977, "Action|Adventure|Romance|Sci-Fi|War"),
    ("Legends of the Fall", 1994, "Drama|Romance|War|Western"),
    ("Madness of King George, The", 1994, "Drama"),
    ("Natural Born Killers", 1994, "Action|Thriller"),
    ("Outbreak", 1995, "Action|Drama|Thriller"),
    ("Professional, The", 1994, "Crime|Drama|Romance|Thriller"),
    ("Pulp Fiction", 1994, "Crime|Drama"),
    ("Priest", 1994, "Drama"),
    ("Quiz Show", 1994, "Drama"),
    ("Three Colors: Red", 1994, "Drama"),
    ("Shawshank Redemption, The", 1994, "Drama"),
    ("Fargo", 1996, "Crime|Drama|Thriller"),
    ("Return of the Jedi", 1983, "Action|Adventure|Romance|Sci-Fi|War"),
    ("Contact", 1997, "Drama|Sci-Fi"),
    ("English Patient, The", 1996, "Drama|Romance|War"),
    ("Scream", 1996, "Horror|Thriller"),
    ("Liar Liar", 1997, "Comedy"),
    ("Air Force One", 1997, "Action|Thriller"),
    ("Independence Day (ID4)", 1996, "Action|Sci-Fi|War"),
    ("Raiders of the Lost Ark", 1981, "Action|Adventure"),
    ("Godfather, The", 1972, "Action|Crime|Drama"),
]
OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)  # fmt: skip
COUNTERS = ("impressions_24h", "engagements_24h", "engagements_7d")


def movie_features(index: int) -> dict[str, Value]:
    """One MovieLens movie's features in the items topic's shape."""
    title, year, genres = MOVIES[index % len(MOVIES)]
    return {"title": f"{title} ({year})", "genres": genres, "year": year}


def sample_items(n: int, *, seed: int = 0) -> list[tuple[dict[str, Value], dict[str, int]]]:
    """``n`` (features, percentile-bucket counters) pairs cycling through the movies."""
    rng = random.Random(seed)
    return [(movie_features(i), {c: rng.randint(1, 100) for c in COUNTERS}) for i in range(n)]


def sample_users(
    n: int, *, seed: int = 0, history: tuple[int, int] = (30, 60)
) -> list[tuple[dict[str, Value], list[dict[str, Value]]]]:
    """``n`` (profile, engaged movies oldest first) pairs with a history length drawn from ``history``."""
    rng = random.Random(seed)
    users = []
    for _ in range(n):
        profile: dict[str, Value] = {
            "age": rng.randint(16, 70),
            "gender": rng.choice("MF"),
            "occupation": rng.choice(OCCUPATIONS),
            "zip": f"{rng.randint(1000, 99999):05d}",
        }
        length = rng.randint(*history)
        users.append((profile, [movie_features(rng.randrange(len(MOVIES))) for _ in range(length)]))
    return users
