//! The `lucos` command's building blocks, shared with its integration tests.

pub mod buildcmd;
pub mod complete;
pub mod corpus;
pub mod demo;
pub mod guest;
pub mod harness;
pub mod info;
pub mod lpbench;
pub mod modules;
pub mod patchcmd;
pub mod run;
pub mod show;
pub mod signing;
pub mod soak;
pub mod stacks;
