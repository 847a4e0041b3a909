"""Reporting: report.json (a versioned contract), report.md, the terminal table, report.html and the gates."""
