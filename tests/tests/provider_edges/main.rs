//! Issue 18: provider edge cases and limits a new user hit, each pinned by a
//! test first (real worker, real services, replies in the real wire
//! formats), then fixed.

mod conversation;
mod limits;
