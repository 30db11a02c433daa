"""Training data for the tool-retrieval embedding model (`services/embeddings/finetune.py`): 72 tools of a company's
internal services, described as their teams would register them, and 576 requests users type for them, 8 per tool
in mixed styles (terse, chatty, naming the object rather than the action, indirect, with identifiers, typos, now and
then in German, French, Spanish or Dutch). Each tool has near neighbours here (create vs status vs list of one
thing), so the training teaches fine distinctions, not topics.

Held out by construction: none of these tools does the job of a tool the retrieval benchmark ranks (the 15
lmesh-tools ships and bench/tool_catalog_extra.py's 31), and the requests were written without sight of the
benchmark's labelled requests (bench/tool_requests.py). tests/test_retrieval_finetune.py checks that no name or
request is shared.
"""

# ruff: noqa: E501  (data: the descriptions and requests keep the lines their writers gave them)
from __future__ import annotations

TRAIN_TOOLS: tuple[tuple[str, str], ...] = (
    # Hospital / clinic
    ("book_clinic_appointment",
     "Schedules an outpatient appointment for a patient with a doctor, nurse or therapist at one of our clinics. "
     "Takes patient ID, specialty or clinician, preferred date range and site; returns the confirmed slot and a "
     "booking reference."),
    ("cancel_clinic_appointment",
     "Cancels an existing clinic appointment, identified by booking reference or by patient ID plus date. The freed "
     "slot goes back to the waiting list. Optional reason code (e.g. patient unwell, double-booked)."),
    ("get_lab_results",
     "Returns laboratory test results for a patient: test name, value, unit, reference range and abnormal flag, e.g. "
     "full blood count, HbA1c, lipid panel. Filter by patient ID, lab order number or collection date; tests not yet "
     "processed show as 'in progress'."),
    ("request_prescription_refill",
     "Repeat-prescription service. Sends a refill request for a medication the patient already takes to their "
     "prescriber for approval. Input: patient ID, medication, quantity, pick-up pharmacy. Output: request ID and "
     "expected ready date."),
    ("list_active_prescriptions",
     "Lists a patient's current medications - drug, dose, frequency, prescriber, start date, refills remaining. "
     "Read-only; discontinued drugs are excluded unless include_past=true."),
    ("ward_bed_occupancy",
     "Real-time bed board. For every ward, or one given ward, returns total beds, occupied, free, reserved for "
     "incoming admissions and blocked for cleaning (e.g. ICU 18/20 occupied, 1 blocked)."),
    # University
    ("search_course_catalog",
     "Search the university course catalogue by keyword, department, level or semester. Returns course code, title, "
     "credits (ECTS), prerequisites, lecturer and the sections on offer."),
    ("enroll_in_course",
     "Registers a student in a course section for the coming term, checking prerequisites, seat limits and timetable "
     "clashes. Args: student_id, course_code, section. Returns an enrolment confirmation, or the waitlist position "
     "when the section is full."),
    ("student_grades",
     "Academic records API: a student's marks per course, letter grade, credits earned, term GPA and cumulative GPA; "
     "can also return the full transcript."),
    ("library_loans",
     "Lists what a library user currently has borrowed - title, barcode, due date, overdue flag, accrued fines - "
     "plus holds waiting for pickup at the desk."),
    ("renew_library_loan",
     "Extends the due date of a borrowed library item (default +3 weeks). Refused when another reader has placed a "
     "hold or the maximum number of renewals is reached. Params: barcode, or 'all' for every item on the card."),
    ("room_timetable",
     "Timetable of a teaching room or lecture hall: lectures, seminars and exams scheduled there on a given day or "
     "week, with course, lecturer, start and end times. e.g. 'What is on in Hall B on Monday?'"),
    # Legal
    ("search_contract_clauses",
     "Clause-level search across the repository of executed contracts. Query by clause type (indemnity, limitation "
     "of liability, termination, change of control, governing law, MFN) and/or free text; returns the matching "
     "clause text with contract title, counterparty and section number."),
    ("request_nda",
     "Request a new non-disclosure agreement from Legal. Provide counterparty name, contact email, mutual or "
     "one-way, and purpose; Legal drafts it from the standard template and sends it out for e-signature. Returns "
     "an NDA request number."),
    ("nda_request_status",
     "Tracks NDA requests through drafting, sent for signature, countersigned and expired. Lookup by NDA request "
     "number or counterparty."),
    ("legal_matter_status",
     "Status of an open legal matter (litigation, commercial dispute, regulatory inquiry, patent or trademark "
     "filing): current stage, assigned counsel, next deadline or hearing date and the latest case note. Query by "
     "matter number or matter name."),
    ("request_contract_review",
     "Submit a contract, amendment or statement of work for legal review before signature. Attach the document and "
     "state counterparty, contract value and signing deadline; returns a review request ID and the assigned "
     "reviewer."),
    ("contract_expiry_list",
     "Lists contracts by end date: those that expire or auto-renew within N days, their notice period, the last day "
     "to give notice and the internal owner. Filters: department, counterparty, contract type."),
    # Real estate and facilities
    ("parking_availability",
     "Live count of free parking spaces per garage and per level at each office site, including EV charging points "
     "and accessible bays."),
    ("reserve_parking_spot",
     "Books a parking space at an office garage for a given date, optionally a specific bay or an EV charger. "
     "Takes employee ID, office, date and licence plate; returns the allocated bay number."),
    ("book_desk",
     "Hot-desk reservation. Pick office, floor or neighbourhood and date(s); optionally sit near named colleagues or "
     "ask for a standing desk / dual monitors. Returns the desk ID."),
    ("cancel_desk_booking",
     "Releases a desk reservation you no longer need, by booking ID or date, so that colleagues can take the desk. "
     "No-show penalty only applies if not released before 09:00 on the day."),
    ("report_building_fault",
     "Log a building maintenance issue for the facilities team - broken lights, heating/air-con, leaks, lifts, "
     "doors, furniture, AV kit in rooms. Needs location, description and urgency; returns a job reference."),
    ("register_visitor_pass",
     "Pre-registers a guest with reception: visitor name, company, host employee, office, date and arrival time. "
     "Reception prints the badge and the visitor receives a QR code and directions."),
    # Manufacturing
    ("machine_status",
     "Real-time state of shop-floor equipment from the MES: running / idle / down / in setup, current job, cycle "
     "count, OEE for the shift and active alarms. Query by machine ID or production line."),
    ("create_work_order",
     "Creates a production work order: part number, quantity, production line, due date, priority. The order is "
     "released to the shop-floor schedule; returns the WO number."),
    ("work_order_progress",
     "Progress of a production work order: quantity completed vs planned, scrap, current operation and estimated "
     "finish time."),
    ("log_quality_defect",
     "Record a non-conformance found in inspection or on the line. Fields: part or lot number, defect type "
     "(dimensional, surface, assembly, material), quantity affected, station, optional photo. Returns an NCR "
     "number."),
    ("quality_defect_report",
     "Aggregated defect statistics over a period: defect counts and rates in ppm by line, product, defect type or "
     "supplier, with a Pareto chart of the top causes. Reporting only, read-only."),
    ("request_spare_part",
     "Raise a requisition for a spare part from maintenance stores for a specific machine: part number or "
     "description, quantity, machine ID, urgency. Stores picks it or orders it from the supplier; returns the "
     "requisition number."),
    # Marketing and CRM
    ("campaign_performance",
     "Marketing campaign analytics: impressions, clicks, CTR, email opens, conversions, cost per lead and ROI, by "
     "campaign ID or name, for a date range and channel (email, paid social, search, events)."),
    ("create_lead",
     "Add a new sales lead to the CRM: contact name, company, email, phone, source (event, website, referral) and "
     "product interest. The lead is routed automatically to the right sales rep."),
    ("search_leads",
     "Find leads in the CRM by status (new, contacted, qualified, lost), source, owner, region or creation date; "
     "returns name, company, lead score and owner."),
    ("customer_account_lookup",
     "Look up a customer account in the CRM by company name or account ID: subscription tier, annual contract value, "
     "account manager, key contacts, open opportunities and health score."),
    ("newsletter_signup",
     "Subscribe an email address to one of the marketing newsletters (product updates, monthly digest, events). "
     "Double opt-in: a confirmation message goes out first. Records the consent source for GDPR."),
    ("newsletter_unsubscribe",
     "Removes an email address from one or all marketing newsletters and records the opt-out on the GDPR "
     "suppression list."),
    # Software engineering and operations
    ("toggle_feature_flag", "Change a feature flag: switch it on or off, or set a percentage rollout, in one environment "
                            "(dev, staging, prod). Takes the flag key, the environment and the new value; returns the "
                            "flag's previous and new state. Every change is audit-logged."),
    ("feature_flag_state", "Read-only. Returns the current config of a feature flag by key: per-environment on/off, "
                           "rollout %, targeting rules (user segments, tenants), owner, last modified by/at."),
    ("search_logs", "Full-text search over application and server logs shipped to the central log store. Filters: "
                    "service name, host, log level (DEBUG..ERROR), time window (default last 1h), free text or "
                    "key=value, e.g. `service=checkout level=ERROR \"timeout\"`. Returns matching log lines with "
                    "timestamps."),
    ("error_tracker_issues", "Lists grouped exceptions and crashes from the error tracker for a project: each issue's "
                             "exception type, message, first/last seen, event count, affected users and a sample "
                             "stack trace. Sort by frequency or newest; filter by release."),
    ("trigger_ci_build", "Start a new CI pipeline run for a repository at a given branch, tag or commit SHA, optionally "
                         "with extra variables or only selected jobs (e.g. integration tests). Returns the build number "
                         "and a URL to follow it."),
    ("ci_build_status", "Get the outcome of a CI build by build number, or the latest one for a branch or commit: "
                        "queued/running/passed/failed, duration, which job or test failed first, and a link to its "
                        "console output."),
    ("run_sql_query", "Runs a read-only SQL SELECT against the analytics replica of a production database (orders_db, "
                      "users_db, billing_db). Takes the database name and the query; returns up to 1,000 rows as a "
                      "table. Writes and DDL are rejected."),
    ("api_quota_usage", "Shows how much of an API key's or client app's quota has been consumed in the current period: "
                        "requests made, limit, remaining, reset time, plus throttled (HTTP 429) counts per endpoint."),
    ("request_quota_increase", "Ask the API platform team to raise the rate limit or monthly quota of a client "
                               "application. Input: client id, endpoint or product, requested new limit, business "
                               "justification. Returns a request id; approved within 1 business day."),
    ("ssl_cert_expiry", "Check the TLS/SSL certificate served by a hostname: issuer, subject alternative names, "
                        "not-before/not-after dates and days until expiry. Can also list all company certificates "
                        "expiring within N days."),
    # Team chat and collaboration
    ("post_chat_message", "Post a message to a team chat channel (e.g. #eng-backend) or to a thread in it, as the user "
                          "or as a bot. Takes the channel name, the text (markdown allowed) and an optional thread id; "
                          "returns the message permalink."),
    ("create_chat_poll", "Create a poll in a chat channel: a question, 2-10 answer options, single or multiple choice, "
                         "anonymous or not, and an optional closing time. Returns the poll id."),
    ("chat_poll_results", "Fetch the results of a chat poll by poll id, or of the latest poll in a channel: votes per "
                          "option, who voted (non-anonymous polls only) and whether it is still open."),
    ("search_chat_messages", "Search past team chat messages across the channels and DMs the user can see. Filters: "
                             "words or phrases, from:person, in:#channel, before/after a date, has:link/file. Returns "
                             "matching messages with channel, author, time and permalink."),
    # Security
    ("badge_access_log", "Physical security. Returns badge reader events for a person, a badge number or a door: "
                         "timestamp, door/gate, building, granted or denied. Security and facilities managers only; "
                         "max 90 days back."),
    ("deactivate_lost_badge", "Report an employee ID badge as lost or stolen: immediately disables it at every door "
                              "reader and orders a replacement badge for pickup at reception. Takes the employee id or "
                              "badge number."),
    ("report_phishing", "Forward a suspicious email, text message or call to the security operations centre as possible "
                        "phishing. Takes the message (or its sender, subject and links) and whether anything was "
                        "clicked or entered; the SOC replies with a verdict."),
    ("request_app_access", "Request access to an internal web application through the zero-trust access proxy, so it "
                           "can be used from anywhere without the VPN. Give the app name (e.g. grafana, jenkins, "
                           "hr-portal) and a reason; the app owner approves and the app appears in your access portal."),
    ("device_compliance_status", "Checks whether a laptop or phone meets the company security baseline: disk "
                                 "encryption, OS version and pending patches, endpoint protection agent running, screen "
                                 "lock, jailbreak/root detection. Returns compliant or non-compliant with the failing "
                                 "checks and how to fix them."),
    # Procurement
    ("create_purchase_request", "Raise a purchase request (PR) for goods or services: item or description, quantity, "
                                "estimated cost, supplier if known, cost centre and needed-by date. Routed to the budget "
                                "owner for approval; returns a PR number."),
    ("purchase_request_status", "Where is my PR? Looks up a purchase request by PR number or requester and returns its "
                                "approval step, approver, comments, and the purchase order number once it has been "
                                "converted into a PO."),
    ("supplier_contract_terms", "Look up the contract the company holds with a supplier or vendor: contract number, "
                                "start and end dates, auto-renewal and notice period, payment terms (e.g. net 30), "
                                "agreed rates/discounts, SLA and the contract owner in procurement."),
    ("search_procurement_catalog", "Searches the approved purchasing catalogue for items employees can order without a "
                                   "quote, e.g. laptops, office chairs, toner, software licences: item code, "
                                   "description, unit price, preferred supplier and lead time."),
    ("cost_center_budget", "Returns the budget of a cost centre or project code for the fiscal year: approved amount, "
                           "actuals spent, committed (open POs) and remaining, by quarter."),
    # Recruiting
    ("list_job_openings", "List the company's open positions (requisitions): title, team, location, remote option, "
                          "level, hiring manager and posting date. Filter by department, location or keyword. Used for "
                          "internal mobility and referrals."),
    ("candidate_pipeline", "Recruiting pipeline for one job requisition: the candidates at each stage (applied, phone "
                           "screen, onsite, offer, hired, rejected), days in stage and the recruiter. Hiring managers "
                           "and recruiters only."),
    ("submit_interview_feedback", "Submit an interviewer's scorecard for a candidate after an interview: candidate, "
                                  "interview type, ratings per competency, hire/no-hire recommendation and written "
                                  "notes. Feedback is locked once submitted."),
    ("refer_candidate", "Submit an employee referral: the referred person's name, email, CV or LinkedIn URL, the "
                        "requisition they fit and how you know them. Tracks referral bonus eligibility."),
    # Fleet and energy
    ("book_pool_car", "Reserve a car from the company pool fleet for a business trip: pickup site, start and return "
                      "date/time, number of seats, EV preferred or not. Returns the booking id, the car's plate and the "
                      "key locker code."),
    ("cancel_pool_car", "Cancel or shorten an existing pool car reservation by booking id, releasing the car for "
                        "colleagues. Late cancellations (less than 2 h before pickup) are noted against the cost "
                        "centre."),
    ("ev_charger_status", "Live status of the EV charging points in the company car parks: per charger free, charging "
                          "or out of order, connector type (Type 2, CCS), power in kW, and how long the current session "
                          "has been running."),
    ("office_energy_usage", "Energy reporting from the building management system: electricity, heating/gas and water "
                            "consumption of an office site per day, week or month, with comparison to last year and a "
                            "CO2e estimate. E.g. kWh used by the Munich office in March."),
    # Food and events
    ("canteen_menu", "Today's or this week's menu in the staff canteens, by site: dishes per counter, prices, "
                     "vegetarian/vegan marks and allergens (gluten, nuts, lactose...)."),
    ("order_catering", "Order catering for a meeting or event from the in-house kitchen: date, time, delivery room, "
                       "headcount, menu package (breakfast, lunch buffet, coffee & snacks), dietary needs and cost "
                       "centre. Order at least 48 h ahead."),
    ("list_company_events", "Upcoming company events and social activities: all-hands, summer party, hackathons, team "
                            "sports, volunteering days, with date, place, description and spots left."),
    ("event_signup", "Register the user, plus guests where allowed, for a company event by event id or name, with "
                     "dietary needs or t-shirt size where asked. Returns a confirmation."),
)

TRAIN_REQUESTS: tuple[tuple[str, str], ...] = (
    # book_clinic_appointment
    ("book gp appointment next tuesday morning", "book_clinic_appointment"),
    ("I've had this rash on my arm for two weeks now and it's not going away, could you get me in to see a "
     "dermatologist sometime next week, ideally after 3pm?", "book_clinic_appointment"),
    ("my knee is still swollen after physio, need to see the orthopaedic surgeon again", "book_clinic_appointment"),
    ("is it possible to get a slot with Dr. Okafor at the Northside clinic before the end of the month?",
     "book_clinic_appointment"),
    ("patient P-448213 needs a follow-up with cardiology on 14 March, any time", "book_clinic_appointment"),
    ("can u book me in w/ the physio thurs pls", "book_clinic_appointment"),
    ("Ik wil graag een afspraak maken bij de huisarts, liefst woensdag.", "book_clinic_appointment"),
    ("annual checkup - schedule one for me at any clinic near Riverside", "book_clinic_appointment"),
    # cancel_clinic_appointment
    ("cancel my appointment tomorrow", "cancel_clinic_appointment"),
    ("I won't make my dermatology visit on friday, my flight got moved, so please drop it and let someone else "
     "have the slot", "cancel_clinic_appointment"),
    ("the 9:30 with Dr. Meyer on the 22nd - I don't need it anymore", "cancel_clinic_appointment"),
    ("who do I tell if I can't come to my physio session next week? want to call it off",
     "cancel_clinic_appointment"),
    ("booking ref APT-20931 please cancel, patient is admitted elsewhere", "cancel_clinic_appointment"),
    ("cancle the eye test on monday", "cancel_clinic_appointment"),
    ("please call off my cardiology appt on thursday, something came up", "cancel_clinic_appointment"),
    ("double booked - remove patient 55102's 2pm ENT slot on 3 June", "cancel_clinic_appointment"),
    # get_lab_results
    ("my blood test results", "get_lab_results"),
    ("I had bloods taken last Monday at the Eastgate clinic for my thyroid and nobody has called me, are the "
     "numbers back yet?", "get_lab_results"),
    ("what was my cholesterol on the panel from January?", "get_lab_results"),
    ("is the HbA1c for patient 30918 out of range?", "get_lab_results"),
    ("lab order LO-77812 - results please", "get_lab_results"),
    ("urine culture results for the patient in bed 12 on ward 4B", "get_lab_results"),
    ("did my covid pcr come back yet", "get_lab_results"),
    ("potassium from this morning's sample, MRN 664201?", "get_lab_results"),
    # request_prescription_refill
    ("refill my inhaler", "request_prescription_refill"),
    ("I'm down to my last three tablets of lisinopril and I'm travelling on Sunday, can you ask the doctor to renew "
     "it so I can pick it up at the Main Street pharmacy?", "request_prescription_refill"),
    ("running out of metformin", "request_prescription_refill"),
    ("how do I get more of my blood pressure pills without seeing the doctor again?",
     "request_prescription_refill"),
    ("patient 88123 - repeat sertraline 50mg x 30, pharmacy at Central", "request_prescription_refill"),
    ("need a refil on my eczema cream pls", "request_prescription_refill"),
    ("Ich brauche ein neues Rezept für meine Schilddrüsentabletten, bitte nachbestellen.",
     "request_prescription_refill"),
    ("can the 90-day supply of atorvastatin be sent to the pharmacy near work?", "request_prescription_refill"),
    # list_active_prescriptions
    ("what meds am I on", "list_active_prescriptions"),
    ("I'm seeing a new specialist tomorrow and they asked me to bring a list of everything I currently take, "
     "including doses - can you pull that up?", "list_active_prescriptions"),
    ("how many refills are left on my levothyroxine?", "list_active_prescriptions"),
    ("which doctor prescribed my antidepressant and what dose is it?", "list_active_prescriptions"),
    ("current medication list for patient 20077", "list_active_prescriptions"),
    ("is the ibuprofen still on my active scripts or was it stopped?", "list_active_prescriptions"),
    ("mdication list for mum, patient id 41290", "list_active_prescriptions"),
    ("show all my prescriptions with doses", "list_active_prescriptions"),
    # ward_bed_occupancy
    ("free beds ICU", "ward_bed_occupancy"),
    ("We've got three patients in A&E waiting for admission to general medicine - how many beds are actually open "
     "up there right now?", "ward_bed_occupancy"),
    ("is maternity full tonight?", "ward_bed_occupancy"),
    ("ward 4B occupancy", "ward_bed_occupancy"),
    ("how many beds are blocked for cleaning across the hospital at the moment?", "ward_bed_occupancy"),
    ("any beds left on paeds?", "ward_bed_occupancy"),
    ("who can tell me if there's room on the surgical ward for a transfer from St. Mary's?", "ward_bed_occupancy"),
    ("can intensive care take another patient or is every bed taken?", "ward_bed_occupancy"),
    # search_course_catalog
    ("machine learning courses spring", "search_course_catalog"),
    ("I'm a second-year economics student looking for an elective on behavioural finance or something similar "
     "next semester, what is offered?", "search_course_catalog"),
    ("what are the prerequisites for CS301?", "search_course_catalog"),
    ("how many ECTS is the intro to philosophy module?", "search_course_catalog"),
    ("is there any course on Renaissance art taught in English?", "search_course_catalog"),
    ("who teaches Organic Chemistry II this year", "search_course_catalog"),
    ("stats courses for non-majors, level 100 or 200", "search_course_catalog"),
    ("history modules available next semestre?", "search_course_catalog"),
    # enroll_in_course
    ("sign me up for MATH210", "enroll_in_course"),
    ("I finally passed the prerequisite over the summer so I'd like to get into the advanced databases class, "
     "section B if there's still space", "enroll_in_course"),
    ("student 2023-44817 register for BIO150 lab section 3", "enroll_in_course"),
    ("can I still join the Spanish A2 class this term or is registration closed?", "enroll_in_course"),
    ("put me on the waitlist for PSY220 if it's full", "enroll_in_course"),
    ("enrol me in the thursday seminar of ECON101", "enroll_in_course"),
    ("enrole in intro to python pls", "enroll_in_course"),
    ("je voudrais m'inscrire au cours de droit européen, groupe 2", "enroll_in_course"),
    # student_grades
    ("my grades", "student_grades"),
    ("I just want to know if I passed thermodynamics, the exam was two weeks ago and the professor said marks "
     "would be posted by now", "student_grades"),
    ("what's my GPA so far", "student_grades"),
    ("transcript for student 51820", "student_grades"),
    ("what did I get in HIST204 last semester?", "student_grades"),
    ("how many credits have I earned towards my degree?", "student_grades"),
    ("did they release the marks for the stats final", "student_grades"),
    ("my mark for microeconomics?", "student_grades"),
    # library_loans
    ("my library books", "library_loans"),
    ("I think I still have a couple of books from the library at home but I can't remember which ones or when "
     "they need to go back", "library_loans"),
    ("when is 'Gödel, Escher, Bach' due back?", "library_loans"),
    ("do I owe any late fines at the library?", "library_loans"),
    ("items on loan to card 2900144512", "library_loans"),
    ("is my hold on the statistics textbook ready to collect?", "library_loans"),
    ("overdue books?", "library_loans"),
    ("whats checked out on my acount", "library_loans"),
    # renew_library_loan
    ("renew my books", "renew_library_loan"),
    ("I'm not done with the thesis literature yet - could you push back the return date on the two books I have "
     "out on research methods?", "renew_library_loan"),
    ("extend barcode 31029004417", "renew_library_loan"),
    ("is it possible to keep the Kant book another few weeks?", "renew_library_loan"),
    ("renew all loans on card 2900144512", "renew_library_loan"),
    ("can i renew the linear algebra one again or is it maxed out", "renew_library_loan"),
    ("renew loan pls, I need the books till end of term", "renew_library_loan"),
    ("keep library books longer", "renew_library_loan"),
    # room_timetable
    ("timetable room H2.14 today", "room_timetable"),
    ("I left my umbrella in the big lecture theatre in the science building, when is it empty so I can grab it "
     "without walking into a class?", "room_timetable"),
    ("what's on in Hall B monday morning", "room_timetable"),
    ("is seminar room 3.05 used on wednesday afternoons?", "room_timetable"),
    ("which classes are held in the Aula this week", "room_timetable"),
    ("when's the next lecture in LT1?", "room_timetable"),
    ("room schedule for library seminar room 2 on 12/05", "room_timetable"),
    ("qué clases hay en el aula 101 el viernes", "room_timetable"),
    # search_contract_clauses
    ("limitation of liability clauses with Oracle", "search_contract_clauses"),
    ("Before we sign with the new logistics vendor I'd like to see how we've worded termination for convenience "
     "in our other supplier agreements", "search_contract_clauses"),
    ("which of our contracts have a change of control provision?", "search_contract_clauses"),
    ("governing law in the Siemens MSA?", "search_contract_clauses"),
    ("find 'most favoured nation' wording in signed customer agreements", "search_contract_clauses"),
    ("do any contracts cap liability at less than 12 months fees", "search_contract_clauses"),
    ("indemnificaton clause acme-datadog contract", "search_contract_clauses"),
    ("confidentiality clauses in our agreements with Spanish suppliers", "search_contract_clauses"),
    # request_nda
    ("need an NDA with Brightwave Ltd", "request_nda"),
    ("We're starting talks with a potential acquisition target next week and they want a confidentiality agreement "
     "signed before they share their financials - can legal set one up?", "request_nda"),
    ("mutual nda for jane.doe@lumenai.io, purpose: evaluating a data partnership", "request_nda"),
    ("how do I get a confidentiality agreement going with a new supplier?", "request_nda"),
    ("one-way NDA, counterparty Hoffmann GmbH, we disclose pricing", "request_nda"),
    ("new nda pls for the vendor demo on 4 april", "request_nda"),
    ("can legal send an NDA to the startup we're meeting, Kite Robotics", "request_nda"),
    ("Wir brauchen eine Geheimhaltungsvereinbarung mit der Firma Bauer AG.", "request_nda"),
    # nda_request_status
    ("status NDA-2291", "nda_request_status"),
    ("I asked legal for an NDA with Brightwave about ten days ago and haven't heard anything, has it gone out for "
     "signature?", "nda_request_status"),
    ("has Kite Robotics countersigned yet?", "nda_request_status"),
    ("is our nda with Hoffmann still valid or expired?", "nda_request_status"),
    ("where is my confidentiality agreement request", "nda_request_status"),
    ("did the mutual nda for lumenai get signed", "nda_request_status"),
    ("nda stauts for vendor Pixelworks", "nda_request_status"),
    ("what stage is the NDA with Grupo Andes at?", "nda_request_status"),
    # legal_matter_status
    ("matter LM-2024-017 status", "legal_matter_status"),
    ("The supplier dispute with Northgate over the late deliveries went to legal months ago, where does that stand "
     "now? Is there a hearing date?", "legal_matter_status"),
    ("who's the lawyer on the trademark opposition for our logo?", "legal_matter_status"),
    ("next deadline in the Alvarez employment case", "legal_matter_status"),
    ("any update on the GDPR inquiry from the data protection authority?", "legal_matter_status"),
    ("is the patent filing for the sensor housing still pending", "legal_matter_status"),
    ("lawsuit vs Crestline - whats happening", "legal_matter_status"),
    ("où en est le litige avec notre ancien distributeur ?", "legal_matter_status"),
    # request_contract_review
    ("legal review for vendor contract, 80k, need by friday", "request_contract_review"),
    ("Sales just got the customer's redlines back on the enterprise agreement and we want to sign by end of "
     "quarter - can someone in legal look it over?", "request_contract_review"),
    ("please have a lawyer check this SaaS agreement with CloudPeak before I sign", "request_contract_review"),
    ("who do I send a supplier agreement to so legal can approve it?", "request_contract_review"),
    ("review amendment #3 to the Globex lease, deadline 2024-06-30", "request_contract_review"),
    ("can legal look at the attached reseller terms, value approx €250,000", "request_contract_review"),
    ("contract reveiw request - marketing agency SOW", "request_contract_review"),
    ("need sign-off from legal on the new office cleaning contract", "request_contract_review"),
    # contract_expiry_list
    ("contracts expiring next 90 days", "contract_expiry_list"),
    ("We got burned last year when a software subscription auto-renewed without anyone noticing, so which of our "
     "agreements renew in the next quarter?", "contract_expiry_list"),
    ("when does the Salesforce contract end and what's the notice period?", "contract_expiry_list"),
    ("last day to give notice on the office lease", "contract_expiry_list"),
    ("marketing dept contracts up for renewal this year", "contract_expiry_list"),
    ("any supplier agreements running out before december?", "contract_expiry_list"),
    ("auto renewals in july", "contract_expiry_list"),
    ("welke contracten lopen dit jaar af?", "contract_expiry_list"),
    # parking_availability
    ("free parking spaces HQ", "parking_availability"),
    ("I'm driving in right now and running late because of the dentist, is the garage already full or will I "
     "find something?", "parking_availability"),
    ("any EV chargers free at the Dublin office?", "parking_availability"),
    ("is P2 full?", "parking_availability"),
    ("how many accessible bays are open in the north car park", "parking_availability"),
    ("parking lot status", "parking_availability"),
    ("whre can i park right now, is level -1 full", "parking_availability"),
    ("¿Quedan plazas libres en el parking de la oficina de Madrid?", "parking_availability"),
    # reserve_parking_spot
    ("reserve parking tomorrow", "reserve_parking_spot"),
    ("My partner has the car seat in their car so I'm driving myself on Thursday - could you hold a spot for me in "
     "the Amsterdam garage?", "reserve_parking_spot"),
    ("book EV charger bay for 12 Nov, plate AB-123-CD", "reserve_parking_spot"),
    ("can I get a guaranteed space for the whole week of the offsite?", "reserve_parking_spot"),
    ("save me a parking place friday, HQ", "reserve_parking_spot"),
    ("need a spot in the Munich office garage on 3/14, employee 10442", "reserve_parking_spot"),
    ("hold bay 27 for me next monday", "reserve_parking_spot"),
    ("reserve a parkng space on monday", "reserve_parking_spot"),
    # book_desk
    ("book a desk tomorrow", "book_desk"),
    ("The whole data team is coming in on Wednesday for planning, I'd like to sit near them on the 5th floor if "
     "there's a desk free", "book_desk"),
    ("standing desk with two monitors, thursday, london", "book_desk"),
    ("is it possible to reserve a spot by the window on floor 3 for next week?", "book_desk"),
    ("desk 4.27 for 18 March pls", "book_desk"),
    ("I need somewhere to sit at the Berlin office on monday", "book_desk"),
    ("hot desk friday", "book_desk"),
    ("workstation on the 2nd floor tuesday please", "book_desk"),
    # cancel_desk_booking
    ("cancel desk tomorrow", "cancel_desk_booking"),
    ("My kid is sick so I'm working from home today after all, please give up the desk I booked on floor 5",
     "cancel_desk_booking"),
    ("release desk 4.27 on 18 March", "cancel_desk_booking"),
    ("I won't be in the office next week, free up my desk reservations", "cancel_desk_booking"),
    ("booking DSK-88412 not needed anymore", "cancel_desk_booking"),
    ("cancle my hot desk for wed", "cancel_desk_booking"),
    ("can someone else have my desk on friday, plans changed", "cancel_desk_booking"),
    ("undo my desk reservation for tomorrow", "cancel_desk_booking"),
    # report_building_fault
    ("the projector in room 4 is dead again", "report_building_fault"),
    ("It's freezing on the third floor east wing, the heating seems to have been off since this morning and people "
     "are wearing coats at their desks", "report_building_fault"),
    ("water dripping from the ceiling in the kitchen on level 2", "report_building_fault"),
    ("lift B stuck between floors", "report_building_fault"),
    ("who do I talk to about the flickering lights above desk 5.12?", "report_building_fault"),
    ("toilet on 1st floor mens is blocked", "report_building_fault"),
    ("the automatic door at the main entrance wont close", "report_building_fault"),
    ("de airco in vergaderzaal Oslo maakt een hoop lawaai", "report_building_fault"),
    # register_visitor_pass
    ("visitor pass for John Smith tomorrow", "register_visitor_pass"),
    ("A candidate is coming in for a final interview on Tuesday at 10 and I want reception to have a badge ready "
     "for her when she arrives", "register_visitor_pass"),
    ("guest badge: Maria Lopez, Acme Corp, host me, 2024-05-07 14:00", "register_visitor_pass"),
    ("my parents are stopping by the office friday, how do I get them through the gate?", "register_visitor_pass"),
    ("register 3 contractors from BuildRight for monday at the Leeds site", "register_visitor_pass"),
    ("client visit thursday, reception needs to know they're coming", "register_visitor_pass"),
    ("pre register vistor Tom Baker 9am", "register_visitor_pass"),
    ("can you sign in a guest for tomorrow at 9 at front desk?", "register_visitor_pass"),
    # machine_status
    ("CNC-07 status", "machine_status"),
    ("The guys on line 3 say output looks low this morning, is the packaging machine actually running or has it "
     "been sitting in an alarm?", "machine_status"),
    ("is press 12 up?", "machine_status"),
    ("what's the OEE on line 2 this shift", "machine_status"),
    ("which machines are down right now in hall B?", "machine_status"),
    ("active alarms on robot cell R4", "machine_status"),
    ("is the extruder runing", "machine_status"),
    ("Läuft die Spritzgussmaschine 5 gerade?", "machine_status"),
    # create_work_order
    ("new work order 500 units part 7731-A", "create_work_order"),
    ("Customer just pulled in their delivery by a week, so we need another batch of 2,000 brackets scheduled on "
     "line 4 due next Friday", "create_work_order"),
    ("release production order for HX-220, qty 1200, due 2024-09-15, high priority", "create_work_order"),
    ("how do I get a run of gearbox housings onto the schedule?", "create_work_order"),
    ("make 300 more of the blue caps on line 1", "create_work_order"),
    ("wo for 50 pcs shaft 44-019 rush", "create_work_order"),
    ("we need to produce a batch of the new valve body, can you set that up?", "create_work_order"),
    ("crear una orden de fabricación de 800 piezas de la referencia 5521", "create_work_order"),
    # work_order_progress
    ("WO-10482 progress", "work_order_progress"),
    ("The customer is asking whether the 2,000 brackets will be ready for Friday's truck, how far along is the job "
     "on line 4?", "work_order_progress"),
    ("how many of the 1200 HX-220 are done?", "work_order_progress"),
    ("when will work order 88310 finish", "work_order_progress"),
    ("what operation is the gearbox housing batch at now", "work_order_progress"),
    ("scrap so far on wo 7719?", "work_order_progress"),
    ("is the blue caps run done yet", "work_order_progress"),
    ("how far is workorder 5520", "work_order_progress"),
    # log_quality_defect
    ("log defect: 40 parts with burrs lot L-2291", "log_quality_defect"),
    ("At final inspection we found scratches on the face of about a dozen housings from this morning's batch, I "
     "want that on record before anything ships", "log_quality_defect"),
    ("cracked welds on frame 88-A, station W3, 6 pcs", "log_quality_defect"),
    ("where do I raise a non-conformance for wrong-colour labels?", "log_quality_defect"),
    ("paint bubbles on lot 5531, qty 120", "log_quality_defect"),
    ("holes drilled 0.3mm off on the brackets, need an NCR", "log_quality_defect"),
    ("found rust on incomng steel coils from supplier Novacer", "log_quality_defect"),
    ("25 housings with cracks in lot 7743, please record it", "log_quality_defect"),
    # quality_defect_report
    ("defect rate line 2 last month", "quality_defect_report"),
    ("Management wants to know what our biggest quality problems were this quarter so they can decide where to "
     "invest - what causes the most rejects?", "quality_defect_report"),
    ("ppm for supplier Novacer in 2024", "quality_defect_report"),
    ("which product has the most scrap this week?", "quality_defect_report"),
    ("pareto of defect types for the injection moulding area", "quality_defect_report"),
    ("are surface defects going up since we changed paint?", "quality_defect_report"),
    ("quality stats q3", "quality_defect_report"),
    ("taux de défauts par ligne ce mois-ci", "quality_defect_report"),
    # request_spare_part
    ("need 2x bearing 6205-2RS for CNC-07", "request_spare_part"),
    ("The conveyor belt on packing line 1 is fraying at the edge and will snap soon, can we get a replacement belt "
     "sent down from stores today?", "request_spare_part"),
    ("requisition part 55-1029 qty 4 for press 12, urgent", "request_spare_part"),
    ("how do I get a new drive belt for the extruder?", "request_spare_part"),
    ("replacement nozzle for injection moulder 5", "request_spare_part"),
    ("order spare fuses for robot cell R4", "request_spare_part"),
    ("can stores send up a new servo motor for the palletiser", "request_spare_part"),
    ("need a replacment proximity sensor for line 3", "request_spare_part"),
    # campaign_performance
    ("spring sale campaign stats", "campaign_performance"),
    ("My boss wants a quick readout on how the LinkedIn ads we ran for the webinar did compared to the budget, "
     "especially cost per lead", "campaign_performance"),
    ("open rate of the October newsletter blast", "campaign_performance"),
    ("CTR for campaign CMP-3381 last 7 days", "campaign_performance"),
    ("did the black friday google ads pay off?", "campaign_performance"),
    ("how many conversions came from the trade show retargeting", "campaign_performance"),
    ("campain results for product launch Q2", "campaign_performance"),
    ("Wie gut lief die Sommerkampagne auf Instagram?", "campaign_performance"),
    # create_lead
    ("add lead: Tom Reed, Fabrikam, tom.reed@fabrikam.com", "create_lead"),
    ("I met someone from a logistics startup at the trade fair who's interested in our fleet product, can you get "
     "her into the CRM so sales follows up?", "create_lead"),
    ("new prospect from the website form: priya@northwind.io, wants a demo", "create_lead"),
    ("a friend of mine at Contoso wants pricing, how do I pass that to sales?", "create_lead"),
    ("enter lead from webinar - Luis Ortega, Sunbeam Foods, +34 600 123 456", "create_lead"),
    ("create lead for referral from Globex, contact Ann Lee", "create_lead"),
    ("put this guy in crm as a lead, jake@zenbrew.co", "create_lead"),
    ("new potential customer: Carla Ruiz from Textiles Andinos, interested in the enterprise edition",
     "create_lead"),
    # search_leads
    ("my open leads", "search_leads"),
    ("I'm covering for Marco while he's on holiday and need to see which of his prospects are still uncontacted so "
     "nothing goes cold", "search_leads"),
    ("qualified leads from the Berlin trade show", "search_leads"),
    ("how many new leads came in this week from the website?", "search_leads"),
    ("leads in DACH with score above 80", "search_leads"),
    ("has anyone from Fabrikam already been entered as a lead?", "search_leads"),
    ("lost leads last quarter, reason pricing", "search_leads"),
    ("show unasigned leads", "search_leads"),
    # customer_account_lookup
    ("account info Globex", "customer_account_lookup"),
    ("I've got a call with Initech's CFO in an hour and I want to know what they're paying us, who their account "
     "manager is and whether they're happy", "customer_account_lookup"),
    ("who is the AM for ACC-00912?", "customer_account_lookup"),
    ("what tier is Wayne Enterprises on", "customer_account_lookup"),
    ("health score for Umbrella Corp", "customer_account_lookup"),
    ("key contacts at the Stark Industries account", "customer_account_lookup"),
    ("how much is Soylent worth to us annually", "customer_account_lookup"),
    ("custmer details hooli", "customer_account_lookup"),
    # newsletter_signup
    ("subscribe anna@example.com to the newsletter", "newsletter_signup"),
    ("A customer at the booth asked to get our monthly product updates, her address is lena.fischer@bergmann.de, "
     "can you put her on the list?", "newsletter_signup"),
    ("add me to the events mailing list", "newsletter_signup"),
    ("how can a client start receiving our digest?", "newsletter_signup"),
    ("sign up marco.r@gmail.com for product news", "newsletter_signup"),
    ("pls add these 2 to monthly digest: a.berg@hexa.com, c.dunn@orbit.io", "newsletter_signup"),
    ("inscribir juan@correo.es al boletín", "newsletter_signup"),
    ("I'd like to get the newsletter too", "newsletter_signup"),
    # newsletter_unsubscribe
    ("unsubscribe bob@acme.org", "newsletter_unsubscribe"),
    ("A customer wrote in pretty annoyed that he keeps getting our marketing mails after asking to stop, his "
     "address is k.nguyen@pinnacle.com - take him off everything", "newsletter_unsubscribe"),
    ("stop sending me the monthly digest", "newsletter_unsubscribe"),
    ("opt out j.smith@corp.net from event invitations only", "newsletter_unsubscribe"),
    ("how do I get off the product updates list?", "newsletter_unsubscribe"),
    ("remove from mailing list: lars@vik.no", "newsletter_unsubscribe"),
    ("too many newsletters, unsubcribe me pls", "newsletter_unsubscribe"),
    ("please take my address off the newsletter", "newsletter_unsubscribe"),
    # toggle_feature_flag
    ("turn off new_checkout_flow in prod", "toggle_feature_flag"),
    ("Hey, the new search ranking is causing complaints from a few customers, can you roll it back to 0% for everyone "
     "on production until we figure out what's going on?", "toggle_feature_flag"),
    ("the dark-mode flag should be at 25% on staging, not 100", "toggle_feature_flag"),
    ("is it possible for me to enable the beta_reports_ui flag just in dev myself or do I need someone from platform?",
     "toggle_feature_flag"),
    ("flip flag `pricing-v2` to ON for staging pls", "toggle_feature_flag"),
    ("ramp recommendations_v3 up to 50 percent in prod", "toggle_feature_flag"),
    ("disable the killswitch flg for payments-retry, enviroment prod", "toggle_feature_flag"),
    ("Bitte das Feature-Flag 'smart_reply' in der Produktion ausschalten.", "toggle_feature_flag"),
    # feature_flag_state
    ("is new_checkout_flow on in prod right now?", "feature_flag_state"),
    ("what percentage of users currently get the recommendations_v3 experience", "feature_flag_state"),
    ("Who last changed the pricing-v2 flag? Something changed yesterday afternoon and I want to know who touched it and "
     "what the targeting looks like now.", "feature_flag_state"),
    ("flag status dark_mode all envs", "feature_flag_state"),
    ("which tenants are targeted by the enterprise_sso flag", "feature_flag_state"),
    ("Why do I see the old search page while my colleague sees the new one? is that flag only rolled out to some people?",
     "feature_flag_state"),
    ("who owns the beta_reports_ui toggle and is it enabled on staging", "feature_flag_state"),
    ("chek smart_reply flag config", "feature_flag_state"),
    # search_logs
    ("grep logs for 'connection reset' in payment-gateway last 30 min", "search_logs"),
    ("I got a customer complaint that their checkout failed around 14:05 UTC today, can you pull the raw log lines from "
     "the checkout service around that time so I can see what happened?", "search_logs"),
    ("ERROR lines from host web-07 since midnight", "search_logs"),
    ("where can I see what the auth service printed for request id 9f3c2a7e?", "search_logs"),
    ("log search service=orders level=WARN 'retry'", "search_logs"),
    ("show me the nginx access log entries for /api/v2/export yesterday between 9 and 10", "search_logs"),
    ("need to see the stdout of the billing-worker pods from last night's batch run", "search_logs"),
    ("buscar en los logs del servicio sync-worker los mensajes 'deadlock' de la última hora", "search_logs"),
    # error_tracker_issues
    ("top crashes in the android app this week", "error_tracker_issues"),
    ("Since release 4.12 went out our mobile users seem to be hitting some new exception, can you list the error groups "
     "that first appeared in that release and how many users each affects?", "error_tracker_issues"),
    ("NullPointerException in checkout-api: how many events so far and where's the stack trace?",
     "error_tracker_issues"),
    ("most frequent unhandled exceptions web-frontend", "error_tracker_issues"),
    ("which errors are affecting the most users in the ios app right now", "error_tracker_issues"),
    ("is the error group \"TypeError: cannot read property 'id' of undefined\" still getting new events after "
     "yesterday's fix?", "error_tracker_issues"),
    ("newest exceptions reported for project billing-service, sorted by first seen", "error_tracker_issues"),
    ("sentry-style issue list for the partner-portal pls, just the top 10", "error_tracker_issues"),
    # trigger_ci_build
    ("rerun the pipeline on main for repo web-shop", "trigger_ci_build"),
    ("kick off a build of feature/login-refactor", "trigger_ci_build"),
    ("Could you start CI on commit 3e9a1fd in the payments repo? The last run died because the runner went away, "
     "nothing wrong with the code.", "trigger_ci_build"),
    ("run just the integration tests job for branch release/2.8", "trigger_ci_build"),
    ("build tag v5.3.0 of mobile-app with TARGET=beta", "trigger_ci_build"),
    ("how do I get a fresh pipeline going on my branch without pushing an empty commit?", "trigger_ci_build"),
    ("start a full build of data-platform with RUN_E2E=true", "trigger_ci_build"),
    ("lance un build CI sur la branche hotfix/tva du dépôt api-clients", "trigger_ci_build"),
    # ci_build_status
    ("did build #48213 pass?", "ci_build_status"),
    ("why is main red on the web-shop repo, which test is failing", "ci_build_status"),
    ("I pushed to feature/login-refactor about 20 minutes ago and the PR still shows the check as pending - is the "
     "pipeline queued or actually running?", "ci_build_status"),
    ("latest ci result for release/2.8", "ci_build_status"),
    ("how long did the last pipeline on payments take and where's the console output", "ci_build_status"),
    ("is the build for commit 3e9a1fd green yet", "ci_build_status"),
    ("first failing job in pipeline 7731?", "ci_build_status"),
    ("Is de laatste build van de main-branch van mobile-app geslaagd?", "ci_build_status"),
    # run_sql_query
    ("SELECT count(*) FROM orders WHERE created_at >= '2024-06-01' on orders_db", "run_sql_query"),
    ("run this on users_db: select country, count(*) from users group by country", "run_sql_query"),
    ("I need a quick number for a slide: how many rows in billing_db.subscriptions have status = 'cancelled'? Can you "
     "just run the query against the replica?", "run_sql_query"),
    ("query the analytics replica for the 20 most recent signups", "run_sql_query"),
    ("can I run a select against prod data without asking a DBA?", "run_sql_query"),
    ("execute sql: select avg(amount) from payments where currency='EUR'", "run_sql_query"),
    ("pull rows from users_db where email like '%@example.org'", "run_sql_query"),
    ("sql query pls - top 10 customers by lifetime value from billing_db", "run_sql_query"),
    # api_quota_usage
    ("how many API calls has client app partner-acme-42 made this month", "api_quota_usage"),
    ("We keep getting HTTP 429 from the maps endpoint in our integration - how close are we to the limit and when does "
     "it reset?", "api_quota_usage"),
    ("remaining quota for api key ending 7f2c", "api_quota_usage"),
    ("rate limit usage per endpoint for the mobile backend client", "api_quota_usage"),
    ("are we being throttled on the search API", "api_quota_usage"),
    ("quota left on geocoding api?", "api_quota_usage"),
    ("show me how many requests the reporting-bot used vs its limit today", "api_quota_usage"),
    ("is our integration about to hit its monthly cap on /v1/payments?", "api_quota_usage"),
    # request_quota_increase
    ("raise the rate limit for client partner-acme-42 to 500 req/s", "request_quota_increase"),
    ("We're onboarding a large customer next week and our integration will need roughly 3x the current monthly API "
     "quota on the search product - how do I ask the platform team for more?", "request_quota_increase"),
    ("need a higher quota on the maps endpoint, the current one is too small for us", "request_quota_increase"),
    ("request limit increase: client id mobile-backend, /v1/orders, 2M/month, reason: holiday peak",
     "request_quota_increase"),
    ("who approves bumping an app's api cap?", "request_quota_increase"),
    ("can the reporting-bot get its daily limit doubled", "request_quota_increase"),
    ("quota incrase request for geocoding api pls", "request_quota_increase"),
    ("Wir brauchen ein höheres API-Limit für unsere App partner-portal, bitte eine Erhöhung auf 10.000 Anfragen pro "
     "Minute beantragen.", "request_quota_increase"),
    # ssl_cert_expiry
    ("when does the cert for shop.acme.com expire", "ssl_cert_expiry"),
    ("Browser shows a certificate warning on status.acme.io for some colleagues - can you check what the TLS cert there "
     "says, issuer and validity dates?", "ssl_cert_expiry"),
    ("list certificates expiring in the next 30 days", "ssl_cert_expiry"),
    ("days until ssl expiry api.acme.com", "ssl_cert_expiry"),
    ("is the wildcard *.internal.acme.net certificate still valid through december?", "ssl_cert_expiry"),
    ("which SANs are on the cert served by login.acme.com", "ssl_cert_expiry"),
    ("tls cert check for partners.acme.de", "ssl_cert_expiry"),
    ("our https padlock on www.acme.fr: will it run out before the summer?", "ssl_cert_expiry"),
    # post_chat_message
    ("post in #eng-backend: code freeze starts friday 18:00", "post_chat_message"),
    ("tell the #office-berlin channel that the coffee machine is fixed", "post_chat_message"),
    ("Can you drop a note in the release thread on #mobile saying QA signed off on 4.12 and we're good to go?",
     "post_chat_message"),
    ("send 'standup moved to 10:15 today' to #team-data", "post_chat_message"),
    ("message the #random channel: cake in the kitchen on the 3rd floor", "post_chat_message"),
    ("let everyone in #support-tier2 know the phone lines are back", "post_chat_message"),
    ("announce in #all-hands-questions that the slides are uploaded", "post_chat_message"),
    ("publica en el canal #ventas-iberia: la reunión de mañana se cancela", "post_chat_message"),
    # create_chat_poll
    ("make a poll in #team-data: pizza or sushi for friday?", "create_chat_poll"),
    ("I want to ask my team which day works best for the offsite - Tue, Wed or Thu - as a quick vote in our channel, "
     "anonymous please, closing tomorrow noon", "create_chat_poll"),
    ("poll: should we move retro to biweekly? yes/no, #eng-backend", "create_chat_poll"),
    ("can I let people vote on the new team name in chat, multiple choice allowed", "create_chat_poll"),
    ("start a vote in #office-berlin about the new opening hours of the bike room", "create_chat_poll"),
    ("create anonymous poll 'how was onboarding?' options 1-5 in #new-joiners", "create_chat_poll"),
    ("quick pol for #mobile: dark mode default yes/no", "create_chat_poll"),
    ("Maak een peiling in #team-amsterdam: borrel op donderdag of vrijdag?", "create_chat_poll"),
    # chat_poll_results
    ("results of the pizza vs sushi poll in #team-data", "chat_poll_results"),
    ("who voted for thursday in the offsite poll?", "chat_poll_results"),
    ("is the team name poll still open and which option is winning?", "chat_poll_results"),
    ("poll 88213 tally", "chat_poll_results"),
    ("I set up a vote in #eng-backend last week about moving retro to biweekly and forgot to check - how did it come "
     "out?", "chat_poll_results"),
    ("how many people picked 'no' in the dark mode poll in #mobile", "chat_poll_results"),
    ("did everybody in the channel vote already on the onboarding poll", "chat_poll_results"),
    ("final count of the latest poll in #office-berlin", "chat_poll_results"),
    # search_chat_messages
    ("find the message where Priya shared the staging db rotation schedule link", "search_chat_messages"),
    ("search chat for 'Q3 offsite' in #leadership", "search_chat_messages"),
    ("Someone posted a link to the new brand guidelines in one of the design channels last month, I can't remember who "
     "- can you find it?", "search_chat_messages"),
    ("messages from tom.becker@acme.com mentioning 'migration' before May 1", "search_chat_messages"),
    ("what did Marco say in the #mobile channel about the release date", "search_chat_messages"),
    ("find that chat thread about the parking garage closure", "search_chat_messages"),
    ("hunt down the DM where Lena sent me the vendor contact", "search_chat_messages"),
    ("serach chat has:file budget spreadsheet in #finance-ops", "search_chat_messages"),
    # badge_access_log
    ("badge swipes for badge 004417 last week", "badge_access_log"),
    ("Who entered the server room door B2-07 on Saturday night? Security wants a list of everyone who badged in between "
     "22:00 and 06:00.", "badge_access_log"),
    ("when did j.smith badge into the Munich building yesterday", "badge_access_log"),
    ("denied entries at the loading dock gate this month", "badge_access_log"),
    ("was anyone in the lab after hours on 2024-03-14", "badge_access_log"),
    ("door access history for employee 55821", "badge_access_log"),
    ("¿Quién entró anoche al almacén de la planta 2? Necesito el registro de accesos con tarjeta.", "badge_access_log"),
    ("check if the contractor's badge was used at the main entrance after his contract ended", "badge_access_log"),
    # deactivate_lost_badge
    ("lost my badge", "deactivate_lost_badge"),
    ("I think my access card was stolen from my bag on the train this morning, please block it so nobody can get into "
     "the building with it", "deactivate_lost_badge"),
    ("deactivate badge 004417 and order a new one", "deactivate_lost_badge"),
    ("can't find my ID card anywhere, what do I do", "deactivate_lost_badge"),
    ("my employee card is gone, employee id 55821", "deactivate_lost_badge"),
    ("new joiner left his badge in a taxi, need it disabled asap", "deactivate_lost_badge"),
    ("Ich habe meinen Mitarbeiterausweis verloren, bitte sperren.", "deactivate_lost_badge"),
    ("block the badge of m.rossi, it fell out of his pocket somewhere at the airport", "deactivate_lost_badge"),
    # report_phishing
    ("got a weird email claiming to be from IT asking me to verify my password", "report_phishing"),
    ("suspicious mail from payroll-update@acme-hr.co with a link to 'view your bonus'", "report_phishing"),
    ("I clicked a link in an email pretending to be DocuSign and typed my credentials before I realised - what now?",
     "report_phishing"),
    ("someone texted me pretending to be the CEO asking for gift cards", "report_phishing"),
    ("report phish", "report_phishing"),
    ("is this email legit? sender 'microsoft-support@outlook-secure.net', subject 'Your mailbox is full'",
     "report_phishing"),
    ("forward this fake invoice email to security: from billing@acme-invoices.biz", "report_phishing"),
    ("J'ai reçu un mail bizarre avec une pièce jointe .zip qui prétend venir de la banque, je le signale où ?",
     "report_phishing"),
    # request_app_access
    ("need access to grafana from home without VPN", "request_app_access"),
    ("request access to jenkins via the access portal, reason: I maintain the build infra", "request_app_access"),
    ("I'm travelling next month and the VPN client doesn't work on my new laptop - is it possible to reach the hr-portal "
     "through the browser instead?", "request_app_access"),
    ("add kibana to my apps in the zero trust portal", "request_app_access"),
    ("how do I get the finance dashboard app to show up in my app launcher", "request_app_access"),
    ("give me access to metabase, I'm joining the analytics team", "request_app_access"),
    ("Can I open confluence remotely w/o vpn?", "request_app_access"),
    ("acces request: app=vault-ui reason=secrets rotation", "request_app_access"),
    # device_compliance_status
    ("is my laptop compliant", "device_compliance_status"),
    ("Outlook on my phone suddenly says my device doesn't meet the company's security requirements - what's missing?",
     "device_compliance_status"),
    ("compliance check for MacBook serial C02XK1ABJG5H", "device_compliance_status"),
    ("why is my machine flagged non-compliant, I did the updates", "device_compliance_status"),
    ("is disk encryption on for laptop LT-20931", "device_compliance_status"),
    ("is the endpoint protection agent running on my pc", "device_compliance_status"),
    ("my android phone got blocked from mail bc of 'root detected'?? i never rooted it", "device_compliance_status"),
    ("which security checks does DESKTOP-7781 fail", "device_compliance_status"),
    # create_purchase_request
    ("raise a PR for 3 standing desks, about 1,800 EUR total, cost centre 4410", "create_purchase_request"),
    ("I need to buy a licence for a profiling tool (JetBrains dotTrace, 5 seats) for my team - how do I get the "
     "purchase approved?", "create_purchase_request"),
    ("new purchase request: external translation agency, 12k, needed by 30 June", "create_purchase_request"),
    ("we want to buy 20 monitors for the new team room, where do I request that", "create_purchase_request"),
    ("create purchase req: supplier Dell, 4x Latitude 7440, cc 3302", "create_purchase_request"),
    ("get approval to buy a pallet of printer paper on the marketing cost center", "create_purchase_request"),
    ("request approval to buy a 3D printer (~2500 USD) for the lab", "create_purchase_request"),
    ("Quiero solicitar la compra de 10 sillas ergonómicas para la oficina de Madrid", "create_purchase_request"),
    # purchase_request_status
    ("status of PR-20931", "purchase_request_status"),
    ("has my purchase request for the standing desks been approved yet", "purchase_request_status"),
    ("I raised a request for 20 monitors two weeks ago and haven't heard anything - who is it waiting on?",
     "purchase_request_status"),
    ("PO number for PR 77310?", "purchase_request_status"),
    ("why was my purchase request for the 3D printer rejected", "purchase_request_status"),
    ("where is my PR stuck", "purchase_request_status"),
    ("list my open purchase requests", "purchase_request_status"),
    ("Is mijn inkoopaanvraag PR-4482 al goedgekeurd?", "purchase_request_status"),
    # supplier_contract_terms
    ("contract terms with Dell", "supplier_contract_terms"),
    ("when does our agreement with CleanCo facility services end, and how much notice do we need to give if we don't "
     "want to renew?", "supplier_contract_terms"),
    ("payment terms on the AWS enterprise agreement", "supplier_contract_terms"),
    ("what discount did we negotiate with Staples", "supplier_contract_terms"),
    ("who in procurement owns the contract with TransLingo GmbH", "supplier_contract_terms"),
    ("does the catering supplier contract auto-renew?", "supplier_contract_terms"),
    ("SLA in the contract with our cloud hosting vendor Hetzner", "supplier_contract_terms"),
    ("contract no. C-2023-118 end date and rates", "supplier_contract_terms"),
    # search_procurement_catalog
    ("what laptops can I order from the catalogue", "search_procurement_catalog"),
    ("price of ergonomic office chairs in the purchasing catalog", "search_procurement_catalog"),
    ("Is there a pre-approved webcam I can just order, and how long does delivery take?", "search_procurement_catalog"),
    ("catalogue item code for HP toner 305A", "search_procurement_catalog"),
    ("which standing desks are on the approved list", "search_procurement_catalog"),
    ("find a 27 inch monitor in the buying catalogue under 300 eur", "search_procurement_catalog"),
    ("do we have Adobe Acrobat licences as a catalogue item", "search_procurement_catalog"),
    ("prefered supplier and unit price for whiteboard markers?", "search_procurement_catalog"),
    # cost_center_budget
    ("how much budget left on cost centre 4410", "cost_center_budget"),
    ("Before I raise a PR for the offsite, I want to know how much of our team's 2024 budget has already been spent or "
     "committed.", "cost_center_budget"),
    ("remaining budget project code PRJ-882", "cost_center_budget"),
    ("budget vs actuals Q2 marketing cc 3302", "cost_center_budget"),
    ("can we still afford the conference tickets this year on the engineering budget?", "cost_center_budget"),
    ("committed spend on open POs for cost center 7001", "cost_center_budget"),
    ("wie viel Budget hat die Kostenstelle 5120 noch für dieses Geschäftsjahr?", "cost_center_budget"),
    ("budjet remaining data team fy25", "cost_center_budget"),
    # list_job_openings
    ("open positions in Berlin", "list_job_openings"),
    ("are we hiring any backend engineers right now", "list_job_openings"),
    ("I'm thinking about an internal move into design - do we have anything open there, ideally remote?",
     "list_job_openings"),
    ("list open reqs in finance", "list_job_openings"),
    ("internal job postings senior level, remote ok", "list_job_openings"),
    ("which roles is hiring manager Sarah Kim recruiting for", "list_job_openings"),
    ("any data analyst vacancies in Lisbon?", "list_job_openings"),
    ("¿Hay vacantes abiertas en el equipo de ventas en Madrid?", "list_job_openings"),
    # candidate_pipeline
    ("candidates in pipeline for req 2291", "candidate_pipeline"),
    ("how many people are at onsite stage for the senior backend role", "candidate_pipeline"),
    ("I'm the hiring manager for the Product Designer opening - who's been sitting in the phone screen stage for more "
     "than two weeks?", "candidate_pipeline"),
    ("where is Ana Ortiz in the process for the data analyst job", "candidate_pipeline"),
    ("how many offers out for REQ-4410", "candidate_pipeline"),
    ("pipeline overview sales engineer Paris", "candidate_pipeline"),
    ("who got rejected and who's still active for the QA lead position", "candidate_pipeline"),
    ("recruiter assigned to the candidates for req 3015?", "candidate_pipeline"),
    # submit_interview_feedback
    ("submit my scorecard for Ana Ortiz: strong hire", "submit_interview_feedback"),
    ("Just finished the system design interview with candidate John Lee - solid on scalability, weak on data modelling; "
     "I'd lean no hire. Please log it.", "submit_interview_feedback"),
    ("feedback for today's phone screen with candidate #88120, rating 3/4 on communication",
     "submit_interview_feedback"),
    ("where do I put my notes from the onsite coding round", "submit_interview_feedback"),
    ("record no-hire for Pierre Martin, culture interview, notes: didn't ask any questions",
     "submit_interview_feedback"),
    ("I interviewed Mei yesterday, how do I enter my ratings", "submit_interview_feedback"),
    ("interveiw feedback: Sam Patel, technical, hire", "submit_interview_feedback"),
    ("my verdict on Laura Weber after the panel: great communicator, recommend we hire", "submit_interview_feedback"),
    # refer_candidate
    ("refer my former colleague for the backend role", "refer_candidate"),
    ("I'd like to recommend a friend, Nadia Haddad (nadia.h@gmail.com), for the Product Designer opening - I've worked "
     "with her at my last company.", "refer_candidate"),
    ("how do I submit a referral and do I get a bonus", "refer_candidate"),
    ("referral: Tom Yuen, linkedin.com/in/tomyuen, req 2291", "refer_candidate"),
    ("my cousin is a great data analyst, can I put him forward for the lisbon job?", "refer_candidate"),
    ("add a referral for the sales engineer position, cv attached", "refer_candidate"),
    ("is it possible to refer someone who isn't actively looking", "refer_candidate"),
    ("refferal for QA lead: sara.k@outlook.com", "refer_candidate"),
    # book_pool_car
    ("book a company car tomorrow 8am to 6pm from the Munich site", "book_pool_car"),
    ("I have to visit a client in Leipzig on Thursday and come back Friday evening; can I get one of the pool cars, "
     "ideally electric, with 5 seats?", "book_pool_car"),
    ("reserve fleet car 12 march 09:00-17:00 HQ garage", "book_pool_car"),
    ("need a car for the trade fair, 3 days, starting monday", "book_pool_car"),
    ("any pool car available next wednesday afternoon?", "book_pool_car"),
    ("get me an EV from the pool for a customer visit friday", "book_pool_car"),
    ("Kan ik morgen een poolauto reserveren vanaf kantoor Utrecht?", "book_pool_car"),
    ("company vehicle for 2024-05-06, pickup stuttgart, back same evening", "book_pool_car"),
    # cancel_pool_car
    ("cancel my car booking FL-3391", "cancel_pool_car"),
    ("My client meeting in Leipzig got postponed, so I don't need the pool car I reserved for Thursday anymore - please "
     "release it.", "cancel_pool_car"),
    ("drop the fleet reservation for tomorrow", "cancel_pool_car"),
    ("I only need the pool car until noon on friday, not all day", "cancel_pool_car"),
    ("someone else can take the car I booked for monday, I won't use it", "cancel_pool_car"),
    ("release pool car booking 55210", "cancel_pool_car"),
    ("cancle the EV i reserved for the customer visit", "cancel_pool_car"),
    ("is there a penalty if I cancel my company car reservation an hour before pickup?", "cancel_pool_car"),
    # ev_charger_status
    ("any free chargers in the garage right now", "ev_charger_status"),
    ("Which of the EV charging points at HQ level -2 are free, and is the fast CCS one working again?",
     "ev_charger_status"),
    ("is charger P2-04 out of order", "ev_charger_status"),
    ("how long has the car on charging bay 3 been plugged in", "ev_charger_status"),
    ("type 2 chargers available munich office?", "ev_charger_status"),
    ("ev charging status", "ev_charger_status"),
    ("my car is at 10%, where can I plug in at the Stuttgart site", "ev_charger_status"),
    ("is the wallbox next to the entrance still broken or can I use it", "ev_charger_status"),
    # office_energy_usage
    ("electricity consumption of the Munich office in March", "office_energy_usage"),
    ("For our sustainability report I need the heating and power usage of the Berlin site for 2023 compared with 2022, "
     "plus the CO2 estimate.", "office_energy_usage"),
    ("kWh used per day at HQ last week", "office_energy_usage"),
    ("how much gas did the Lyon building burn this winter", "office_energy_usage"),
    ("did the new LED lighting actually lower the power use in Amsterdam?", "office_energy_usage"),
    ("water usage office Dublin monthly", "office_energy_usage"),
    ("energy dashboard numbers for building B, last 30 days", "office_energy_usage"),
    ("what's the carbon footprint of our Madrid office's energy use this year", "office_energy_usage"),
    # canteen_menu
    ("what's for lunch today", "canteen_menu"),
    ("is there a vegan option in the canteen on Thursday?", "canteen_menu"),
    ("I'm allergic to nuts - which dishes at the Berlin canteen today are safe for me?", "canteen_menu"),
    ("menu this week munich cafeteria", "canteen_menu"),
    ("price of the pasta at counter 2", "canteen_menu"),
    ("wat eten we vandaag in de kantine in Amsterdam?", "canteen_menu"),
    ("does friday's fish dish contain gluten", "canteen_menu"),
    ("canteen menue tomorrow hq", "canteen_menu"),
    # order_catering
    ("order a lunch buffet for 15 people in room 3.12 next tuesday at 12", "order_catering"),
    ("We have a board visit on the 14th - could the kitchen provide coffee, pastries and fruit for 8 at 9:00 in the "
     "executive meeting room, charged to cost centre 1001?", "order_catering"),
    ("catering for the workshop tomorrow, 25 pax, 3 vegetarians", "order_catering"),
    ("sandwiches and drinks delivered for the client meeting on friday", "order_catering"),
    ("can I still get breakfast delivered to our team offsite room for monday or is it too late", "order_catering"),
    ("book the coffee & snacks package for the all hands, 120 people", "order_catering"),
    ("order food for the interview day on 3 june, 6 people, one gluten free", "order_catering"),
    ("catring order: room B-201, 10:00, 12 ppl, cc 4410", "order_catering"),
    # list_company_events
    ("what company events are coming up", "list_company_events"),
    ("when is the summer party this year", "list_company_events"),
    ("Are there any volunteering days planned in the next couple of months? I'd like to do something with my team.",
     "list_company_events"),
    ("upcoming hackathons", "list_company_events"),
    ("any after work activities in the Berlin office this month", "list_company_events"),
    ("is there still space in the company football tournament?", "list_company_events"),
    ("social events calendar for q3", "list_company_events"),
    ("whats on at the office next week socially", "list_company_events"),
    # event_signup
    ("sign me up for the summer party", "event_signup"),
    ("register me and a plus one for the christmas dinner, I'm vegetarian", "event_signup"),
    ("I'd like to join the beach cleanup volunteering day on 21 September - please put my name down, t-shirt size M.",
     "event_signup"),
    ("add me to the hackathon, event id EV-2291", "event_signup"),
    ("count me in for friday's bowling night", "event_signup"),
    ("enroll in the company 5k run, size L", "event_signup"),
    ("how do I register for the all-hands in Lisbon", "event_signup"),
    ("sigm me up for the football tournament, team 'Data Dribblers'", "event_signup"),
)
