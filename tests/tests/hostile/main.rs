//! Hostile input at every boundary (issue 17): one test per attack, named
//! after it, against real bubblewrap, RabbitMQ and Redis. Each test first
//! shows the attack, then that it no longer gets through.

mod api;
mod files;
mod host;
mod llm;
mod network;
