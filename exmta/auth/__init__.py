"""SMTP AUTH for receive connectors: SASL PLAIN/LOGIN over twisted.cred, user back ends, lockout, send-as.

- :mod:`exmta.auth.sasl`: the PLAIN and LOGIN exchanges, sans-IO.
- :mod:`exmta.auth.users`: the users file (argon2id hashes) and its checker.
- :mod:`exmta.auth.ldap`: LDAP / Active Directory simple bind (ldap3, on a thread pool).
- :mod:`exmta.auth.lockout`: the failed-login tarpit and lockout per source and per user.
- :mod:`exmta.auth.sendas`: which envelope senders and From: addresses a user may use.
- :mod:`exmta.auth.smtp`: what the ESMTP server calls (the AUTH command, MAIL and end-of-data checks).
"""
