"""A realistic enterprise catalogue of mesh tools beyond the 15 lmesh-tools ships, for the tool-retrieval benchmark
(bench/tool_retrieval.py): what the teams of a company ("acme") would announce in Consul, described the way each
team would describe its own service. Several are deliberately close to a shipped tool or to each other (currency
vs unit conversion; calendar events vs public holidays vs day of week; wiki vs document vs people search; ticket
create vs status; incident status vs deployment status; leave balance vs leave request; summarising vs counting
text), so that retrieval is tested on real neighbours, not on 40 unrelated topics.

No server implements them: retrieval reads descriptions only.
"""

from __future__ import annotations

from services.tools.catalog import ToolEntry, format_tool_meta


def _tool(name: str, method_path: str, description: str) -> ToolEntry:
    return ToolEntry(name, method_path, " ".join(description.split()))


EXTRA_TOOLS: tuple[ToolEntry, ...] = (
    # HR and payroll
    _tool("leave_balance", "acme.hr.v1.Leave/GetBalance",
          "Show how much paid time off an employee has left this year: vacation days, sick days and personal days "
          "remaining, and the days already booked or taken."),
    _tool("request_leave", "acme.hr.v1.Leave/SubmitRequest",
          "Submit a time-off request for approval by the employee's manager: vacation, sick leave, parental leave "
          "or unpaid leave between a start and an end date."),
    _tool("get_payslip", "acme.payroll.v1.Payslips/GetPayslip",
          "Fetch an employee's payslip for a given month: gross salary, tax and social security deductions, "
          "bonuses and net pay, as a PDF link."),
    _tool("benefits_info", "acme.hr.v1.Benefits/GetCoverage",
          "Explain the benefits an employee is enrolled in: health, dental and vision insurance plans, pension or "
          "401(k) matching, gym allowance and how to change them during open enrollment."),
    _tool("public_holidays", "acme.hr.v1.Holidays/ListHolidays",
          "List the public holidays and company-wide office closures for a country or office location in a given "
          "year, e.g. bank holidays in the UK office in 2025."),
    # Finance
    _tool("submit_expense", "acme.finance.v1.Expenses/SubmitExpense",
          "File an expense claim for reimbursement: amount, currency, category (travel, meals, equipment) and a "
          "receipt photo; it goes to the approver and is paid with the next payroll."),
    _tool("expense_status", "acme.finance.v1.Expenses/GetClaimStatus",
          "Check where an already submitted expense claim stands: pending approval, approved, rejected with the "
          "reason, or reimbursed and on which date."),
    _tool("get_invoice", "acme.finance.v1.Invoices/GetInvoice",
          "Look up a customer or supplier invoice by its number or by company name: amount due, due date, payment "
          "status and the PDF copy."),
    _tool("convert_currency", "acme.finance.v1.FX/Convert",
          "Convert an amount of money between currencies (USD, EUR, GBP, JPY, CHF, ...) at today's exchange rate "
          "or the rate of a past date, as used by the finance team."),
    _tool("stock_quote", "acme.markets.v1.Quotes/GetQuote",
          "Get the latest share price of a listed company by ticker symbol (e.g. AAPL, MSFT), with the day's "
          "change, volume and market capitalisation."),
    # Support and operations
    _tool("create_ticket", "acme.support.v1.Tickets/CreateTicket",
          "Open a new IT or customer support ticket describing a problem (broken laptop, software access, a "
          "customer complaint), with its priority; returns the ticket number."),
    _tool("ticket_status", "acme.support.v1.Tickets/GetTicket",
          "Get the status of an existing support ticket by its number: open, in progress, waiting or resolved, "
          "who it is assigned to and the latest comments."),
    _tool("incident_status", "acme.ops.v1.Incidents/GetStatus",
          "Report ongoing production incidents and outages of the company's services: which systems are degraded "
          "or down, severity, start time and the latest update from the incident commander."),
    _tool("deployment_status", "acme.dev.v1.Deployments/GetStatus",
          "Show the latest deployments of a service to staging or production: which version or commit is live, "
          "who deployed it, when, and whether the rollout succeeded or was rolled back."),
    _tool("on_call_schedule", "acme.ops.v1.OnCall/WhoIsOnCall",
          "Tell who is on call for a team's pager rotation now or on a given date, with their phone number and the "
          "escalation chain."),
    # IT
    _tool("reset_password", "acme.it.v1.Accounts/ResetPassword",
          "Reset a user's forgotten or expired network password, or unlock an account locked after too many "
          "failed sign-ins; sends a one-time link to the registered phone."),
    _tool("it_asset_lookup", "acme.it.v1.Assets/Lookup",
          "Look up IT equipment assigned to an employee or by serial number: laptops, monitors, phones, their "
          "model, warranty end and the VPN certificate issued for the device."),
    # Workplace and calendar
    _tool("book_meeting_room", "acme.facilities.v1.Rooms/BookRoom",
          "Reserve a meeting room in one of the offices for a time slot, by capacity and equipment (screen, video "
          "conferencing, whiteboard)."),
    _tool("calendar_events", "acme.calendar.v1.Calendar/ListEvents",
          "List the meetings and events on someone's work calendar for a day or a date range, with times, "
          "attendees and location; use it to see when a person is busy or free."),
    _tool("schedule_meeting", "acme.calendar.v1.Calendar/CreateEvent",
          "Create a calendar event and send invitations: a meeting with a title, attendees, a start time and a "
          "duration, optionally with a video call link."),
    _tool("send_email", "acme.mail.v1.Mail/Send",
          "Send an email from the user's mailbox to one or more recipients with a subject and a body, optionally "
          "with attachments."),
    _tool("book_travel", "acme.travel.v1.Trips/BookTrip",
          "Book business travel through the company's travel agency: flights, trains, hotels and rental cars "
          "within the travel policy, for given dates and destinations."),
    # Commerce and logistics
    _tool("order_status", "acme.commerce.v1.Orders/GetOrder",
          "Look up a customer order by its order number or the customer's email: items, total, payment state and "
          "whether it has been packed, shipped, delivered or cancelled."),
    _tool("track_shipment", "acme.logistics.v1.Shipments/Track",
          "Track a parcel or freight shipment by its carrier tracking number: current location, scan history and "
          "estimated delivery date."),
    _tool("inventory_stock", "acme.warehouse.v1.Inventory/GetStock",
          "Check how many units of a product (by SKU or name) are in stock in each warehouse, how many are "
          "reserved, and when the next restock arrives."),
    # Knowledge and language
    _tool("search_wiki", "acme.knowledge.v1.Wiki/Search",
          "Search the internal wiki for how-to guides, team pages, onboarding notes and company policies, e.g. "
          "the remote work policy or how to set up the VPN; returns matching pages with snippets."),
    _tool("search_documents", "acme.docs.v1.DocumentSearch/Search",
          "Full-text search over files on the shared drives: contracts, presentations, spreadsheets and PDFs, by "
          "keywords, owner or date modified."),
    _tool("search_code", "acme.dev.v1.CodeSearch/Search",
          "Search the source code of all the company's git repositories for a function, class, string or regular "
          "expression, and show the matching lines with file paths."),
    _tool("translate_text", "acme.language.v1.Translation/Translate",
          "Translate a piece of text from one language into another, e.g. English to German or Japanese to "
          "English, detecting the source language when not given."),
    _tool("summarize_text", "acme.language.v1.Summarizer/Summarize",
          "Write a short summary of a long text, email thread or report: the key points in a few sentences or "
          "bullet points."),
    _tool("weather_forecast", "acme.weather.v1.Forecast/GetForecast",
          "Get the weather forecast for a city for the next days: temperature, rain, wind and conditions, or the "
          "current weather there."),
)


def extra_tool_meta() -> dict[str, str]:
    """The Consul meta announcing the extra tools (checked against the contract)."""
    return format_tool_meta(EXTRA_TOOLS)
