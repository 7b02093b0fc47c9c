//! Helpers for the live mail tests: a real Postfix + Dovecot on 127.0.0.1.

pub mod mailserver;
