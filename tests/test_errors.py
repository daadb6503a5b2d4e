"""The error vocabulary: each transport's table answers every error class of the package with
a status of its own (never the INTERNAL fallback), and every reason is one of `errors.Reason`."""

from __future__ import annotations

import importlib
import pkgutil

import transaction_service
from transaction_service import errors
from transaction_service.api.errors import CODES
from transaction_service.errors import Reason, ServiceError
from transaction_service.http.errors import STATUSES


def service_errors() -> list[type[ServiceError]]:
    """Every ServiceError subclass defined in the package, wherever it is."""
    for module in pkgutil.walk_packages(transaction_service.__path__, "transaction_service."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: list[type[ServiceError]] = []
    todo = [ServiceError]
    while todo:
        for subclass in todo.pop().__subclasses__():
            todo.append(subclass)
            if subclass.__module__.startswith("transaction_service."):
                found.append(subclass)
    return found


ERRORS = service_errors()
# The classes of errors.py that the tables name; the others in the package are their subclasses.
KINDS = {c for c in ERRORS if c.__module__ == errors.__name__}


def test_the_search_finds_errors_py_and_subclasses_elsewhere() -> None:
    assert {"InvalidArgument", "Unavailable"} <= {c.__name__ for c in KINDS}
    assert {"StoreUnavailable", "EventIdConflict"} <= {c.__name__ for c in ERRORS}


def test_each_transport_table_names_every_error_class_of_errors_py_once() -> None:
    assert sorted(kind.__name__ for kind, _ in CODES) == sorted(k.__name__ for k in KINDS)
    assert sorted(kind.__name__ for kind, _, _ in STATUSES) == sorted(k.__name__ for k in KINDS)


def test_every_error_class_of_the_package_maps_to_a_status_on_both_transports() -> None:
    def unmapped(table: list[type[ServiceError]]) -> list[str]:
        return [c.__qualname__ for c in ERRORS if not any(issubclass(c, k) for k in table)]

    assert unmapped([kind for kind, _ in CODES]) == []
    assert unmapped([kind for kind, _, _ in STATUSES]) == []


def test_no_table_row_is_shadowed_by_an_earlier_one() -> None:
    """Rows are tried in order; a row after one of its base classes would never be reached."""
    for table in ([kind for kind, _ in CODES], [kind for kind, _, _ in STATUSES]):
        for i, later in enumerate(table):
            assert not [k.__name__ for k in table[:i] if issubclass(later, k)], later.__name__


def test_reasons_are_their_own_names_in_capitals() -> None:
    """The names clients match on: a value never differs from its name."""
    assert all(reason.value == reason.name and reason.name.isupper() for reason in Reason)
