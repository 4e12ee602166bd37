"""Metadata context query resolution (NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT).

Query syntax we implement (proto.md "Metadata querying" leaves it to servers):

* an exact context name (``base:allocation``, ``qemu:dirty-bitmap:NAME``) selects it
  if the export offers it;
* for LIST only, a query ending in ``:`` (``base:``, ``qemu:dirty-bitmap:``) lists every
  offered context with that prefix (qemu and nbdkit do the same; for SET such a
  query selects nothing);
* for LIST only, an empty query list means "all contexts";
* anything else matches nothing, which is not an error.

Pure functions; no imports beyond typing.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["resolve_queries"]


def resolve_queries(available: Sequence[str], queries: Sequence[str], listing: bool) -> list[str]:
    """Return the offered contexts matched by *queries*, deduplicated, in query order.

    :param available: the contexts the export offers.
    :param queries: the client's query strings.
    :param listing: True for NBD_OPT_LIST_META_CONTEXT, False for SET.
    :return: matched context names.
    """
    if not queries:
        return list(available) if listing else []
    out: list[str] = []
    for query in queries:
        if query in available:
            if query not in out:
                out.append(query)
        elif listing and query.endswith(":"):
            out.extend(name for name in available if name.startswith(query) and name not in out)
    return out
