"""The company directory: ~200 people generated from a fixed seed into SQLite (in memory: the same people on every
start and every replica), searched with FTS5 where SQLite has it, else LIKE. Parameterized SQL only."""

from __future__ import annotations

import random
import re
import sqlite3
import threading
from dataclasses import dataclass

from services.common.errors import InvalidArgument, NotFound

SEED = 18
DOMAIN = "example.com"
DEFAULT_LIMIT = 10
MAX_LIMIT = 100
MAX_QUERY_CHARS = 200

DEPARTMENTS = ("Engineering", "Sales", "Marketing", "Finance", "Human Resources", "Legal", "Operations",
               "Customer Support", "Product", "Research")
CITIES = ("Berlin", "London", "New York", "San Francisco", "Singapore", "Toronto", "Paris", "Sydney")
FIRST_NAMES = ("Ada", "Alan", "Amara", "Ana", "Arjun", "Beatriz", "Ben", "Carlos", "Chen", "Chloe", "Daniel",
               "Dmitri", "Elena", "Emeka", "Fatima", "Felix", "Grace", "Hana", "Hugo", "Ines", "Ivan", "Jade",
               "Jonas", "Julia", "Kenji", "Lars", "Leila", "Liam", "Lucia", "Maya", "Mateo", "Mei", "Nadia", "Noah",
               "Olga", "Omar", "Priya", "Rafael", "Rosa", "Samir", "Sara", "Sofia", "Tariq", "Tom", "Uma", "Victor",
               "Wei", "Yara", "Yusuf", "Zoe")
LAST_NAMES = ("Adams", "Ahmed", "Andersen", "Bauer", "Becker", "Costa", "Dubois", "Fischer", "Garcia", "Gupta",
              "Hansen", "Ito", "Jensen", "Kim", "Kowalski", "Laurent", "Lee", "Lopez", "Martin", "Meyer", "Moreau",
              "Nakamura", "Nguyen", "Novak", "Okafor", "Olsen", "Patel", "Perez", "Petrov", "Rossi", "Santos",
              "Schmidt", "Silva", "Singh", "Smith", "Suzuki", "Tanaka", "Taylor", "Wagner", "Wang", "Weber",
              "Williams", "Wong", "Yilmaz", "Zhang")
TITLES = {
    "Engineering": ("Software Engineer", "Senior Software Engineer", "Site Reliability Engineer", "QA Engineer",
                    "Data Engineer"),
    "Sales": ("Account Executive", "Sales Development Representative", "Account Manager"),
    "Marketing": ("Marketing Specialist", "Content Strategist", "Brand Designer"),
    "Finance": ("Financial Analyst", "Accountant", "Payroll Specialist"),
    "Human Resources": ("HR Business Partner", "Recruiter", "People Operations Specialist"),
    "Legal": ("Corporate Counsel", "Paralegal", "Compliance Officer"),
    "Operations": ("Operations Analyst", "Facilities Coordinator", "IT Support Technician"),
    "Customer Support": ("Support Engineer", "Customer Success Manager", "Support Specialist"),
    "Product": ("Product Manager", "UX Designer", "UX Researcher"),
    "Research": ("Research Scientist", "Machine Learning Researcher", "Research Engineer"),
}
HEADCOUNT = 200


@dataclass(frozen=True)
class Person:
    name: str
    title: str
    department: str
    email: str
    phone: str
    office_city: str
    manager_name: str = ""
    manager_email: str = ""


def generate_people(seed: int = SEED, count: int = HEADCOUNT) -> list[Person]:
    """The directory's people, the same for the same seed: a chief executive, a head per department reporting to
    them, a team lead or two per department reporting to its head, everyone else reporting to a lead."""
    rng = random.Random(seed)
    taken: set[str] = set()

    def new_person(title: str, department: str, manager: Person | None) -> Person:
        while True:
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            email = f"{first}.{last}@{DOMAIN}".lower()
            if email not in taken:
                break
        taken.add(email)
        phone = f"+1-555-{rng.randrange(100, 1000):03d}-{rng.randrange(0, 10_000):04d}"
        city = manager.office_city if manager is not None and rng.random() < 0.6 else rng.choice(CITIES)
        return Person(f"{first} {last}", title, department, email, phone, city,
                      manager.name if manager else "", manager.email if manager else "")

    chief = new_person("Chief Executive Officer", "Executive", None)
    people = [chief]
    leads: dict[str, list[Person]] = {}
    for department in DEPARTMENTS:
        head = new_person(f"Head of {department}", department, chief)
        people.append(head)
        leads[department] = [new_person(f"{department} Team Lead", department, head) for _ in range(2)]
        people.extend(leads[department])
    while len(people) < count:
        department = rng.choice(DEPARTMENTS)
        people.append(new_person(rng.choice(TITLES[department]), department, rng.choice(leads[department])))
    return people


_COLUMNS = "name, title, department, email, phone, office_city, manager_name, manager_email"


class DirectoryStore:
    """The people in an in-memory SQLite database; safe to use from several threads (one lock: queries are
    sub-millisecond)."""

    def __init__(self, people: list[Person] | None = None) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        self.fts = _has_fts5(self._db)
        self._db.execute(f"CREATE TABLE people (id INTEGER PRIMARY KEY, {_COLUMNS}, head INTEGER)")
        rows = [(p.name, p.title, p.department, p.email, p.phone, p.office_city, p.manager_name, p.manager_email,
                 int(p.title.startswith("Head of ")))
                for p in (people if people is not None else generate_people())]
        self._db.executemany(f"INSERT INTO people ({_COLUMNS}, head) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        if self.fts:
            self._db.execute("CREATE VIRTUAL TABLE people_fts USING fts5(name, title, department, office_city, "
                             "content='people', content_rowid='id', tokenize='unicode61 remove_diacritics 2')")
            self._db.execute("INSERT INTO people_fts(people_fts) VALUES ('rebuild')")
        self.departments = tuple(r[0] for r in self._db.execute("SELECT DISTINCT department FROM people "
                                                                "ORDER BY department"))

    def _department(self, department: str) -> str:
        wanted = department.strip().lower()
        for known in self.departments:
            if known.lower() == wanted:
                return known
        raise InvalidArgument("department", f"unknown department {department.strip()[:64]!r}; one of "
                                            f"{', '.join(self.departments)}")

    def search(self, query: str, department: str = "", limit: int = 0) -> tuple[list[Person], int]:
        if len(query) > MAX_QUERY_CHARS:
            raise InvalidArgument("query", f"longer than {MAX_QUERY_CHARS} characters")
        if limit > MAX_LIMIT:
            raise InvalidArgument("limit", f"at most {MAX_LIMIT}")
        words = re.findall(r"\w+", query.lower())
        dept = self._department(department) if department.strip() else None
        if not words and dept is None:
            raise InvalidArgument("query", "empty: give words to search for (a name, title, department or city), "
                                           "or a department")
        conditions: list[str] = []
        params: list[str] = []
        if words and self.fts:
            conditions.append("id IN (SELECT rowid FROM people_fts WHERE people_fts MATCH ?)")
            params.append(" AND ".join(f'"{word}"*' for word in words))  # \w+ words hold no quote
        for word in words if not self.fts else ():
            conditions.append("(lower(name || ' ' || title || ' ' || department || ' ' || office_city) LIKE ? "
                              "ESCAPE '\\')")
            params.append("%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        if dept is not None:
            conditions.append("department = ?")
            params.append(dept)
        where = " AND ".join(conditions)
        with self._lock:
            total = self._db.execute(f"SELECT count(*) FROM people WHERE {where}", params).fetchone()[0]
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM people WHERE {where} ORDER BY name LIMIT ?",
                                    [*params, limit or DEFAULT_LIMIT]).fetchall()
        return [Person(*row) for row in rows], int(total)

    def get(self, email: str) -> Person:
        cleaned = email.strip().lower()
        if not cleaned:
            raise InvalidArgument("email", "empty")
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM people WHERE email = ?", (cleaned,)).fetchone()
        if row is None:
            raise NotFound(f"no one in the directory has the email {cleaned[:128]!r}")
        return Person(*row)

    def list_department(self, department: str) -> list[Person]:
        if not department.strip():
            raise InvalidArgument("department", f"empty; one of {', '.join(self.departments)}")
        dept = self._department(department)
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM people WHERE department = ? ORDER BY head DESC, name",
                                    (dept,)).fetchall()
        return [Person(*row) for row in rows]

    def close(self) -> None:
        self._db.close()


def _has_fts5(db: sqlite3.Connection) -> bool:
    try:
        db.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
        db.execute("DROP TABLE temp.fts5_probe")
        return True
    except sqlite3.OperationalError:
        return False
