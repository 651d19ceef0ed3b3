"""`report --format html`: one self-contained page for the people who sign off a purge.

facts.py   what the page says, read from the store (counted there: the page's size and the
           time to make it do not grow with the job)
charts.py  the charts, drawn by matplotlib (the `html` extra) as inline SVG
page.py    the HTML: no script, nothing to fetch, every stored value escaped
"""

from __future__ import annotations

from typing import TextIO

from bulkdisconnect.report_html.facts import Audit, AuditStore, gather


async def write_html_report(store: AuditStore, job: str, out: TextIO, *, location: str) -> Audit:
    """Write the job's HTML report to `out`; what it showed.

    Raises charts.ChartsUnavailableError, before reading anything, without matplotlib.
    """
    from bulkdisconnect import __version__
    from bulkdisconnect.report_html import charts, page

    charts.check_available()
    audit = await gather(store, job, location=location)
    out.write(page.render(audit, version=__version__))
    return audit
