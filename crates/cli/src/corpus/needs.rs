//! Which of a source's candidate headers it needs, read off the compiler's complaints.
//!
//! A source that does not compile against the old headers needs some of the update's
//! header changes, rarely all of them. Taking every candidate (the fallback) also takes
//! changes the source's own fix never needed: a struct in `net/devlink.h` that changes
//! layout would refuse `net/core/dev.c`'s unrelated fix. So each retry takes only the
//! candidates whose diff changes a name the compiler complained about, `'struct
//! devlink_port' has no member named 'type_dev'` or `implicit declaration of function
//! 'rcu_momentary_eqs'`, until the source compiles or nothing more can be told.

use std::collections::BTreeSet;

/// Words that name no declaration a header could add: C keywords and basic types.
const NOT_NAMES: &[&str] = &[
    "auto", "bool", "char", "const", "double", "enum", "extern", "float", "inline", "int", "long",
    "short", "signed", "sizeof", "static", "struct", "typedef", "union", "unsigned", "void",
    "volatile", "restrict", "return", "NULL", "true", "false",
];

/// The identifiers quoted in compiler diagnostics (`'…'` or `‘…’`), longer than three
/// characters: shorter ones (`sk`, `skb`) are locals that every header's diff mentions.
pub fn quoted_names(message: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in message.lines().filter(|l| l.contains("error:")) {
        let quoted = line
            .split(['\'', '‘', '’'])
            .skip(1)
            .step_by(2)
            .flat_map(|q| q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')));
        for w in quoted {
            let starts_well = w.chars().next().is_some_and(|c| !c.is_ascii_digit());
            if w.len() > 3 && starts_well && !NOT_NAMES.contains(&w) {
                out.insert(w.to_string());
            }
        }
    }
    out
}

/// The files gcc reports errors in (`net/ipv4/tcp_ipv4.c:1508:14: error: …`), as written
/// (relative to the tree, sometimes with a leading `./`).
pub fn error_files(message: &str) -> BTreeSet<String> {
    message
        .lines()
        .filter_map(|l| {
            let (at, _) = l.split_once(": error:")?;
            let mut parts = at.rsplitn(3, ':');
            let (col, line, file) = (parts.next()?, parts.next()?, parts.next()?);
            let numeric = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
            (numeric(col) && numeric(line)).then(|| file.trim_start_matches("./").to_string())
        })
        .collect()
}

/// Where `name` stands in `line` as a whole C identifier, and what follows it.
pub fn word_at<'a>(line: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    line.match_indices(name).filter_map(move |(i, _)| {
        let rest = &line[i + name.len()..];
        (!word(line[..i].chars().next_back()) && !word(rest.chars().next())).then_some(rest)
    })
}

/// Whether a changed line (`+`/`-`, not the file headers) of `diff` has `name` as a word.
pub fn changes_name(diff: &str, name: &str) -> bool {
    diff.lines()
        .filter(|l| !l.starts_with("+++") && !l.starts_with("---"))
        .filter(|l| l.starts_with('+') || l.starts_with('-'))
        .any(|l| word_at(l, name).next().is_some())
}

/// The candidates, not yet `taken`, whose diff changes one of the `complained` names
/// (see [`quoted_names`]). `diffs` pairs each candidate with its diff.
pub fn wanted<'a>(
    complained: &BTreeSet<String>,
    diffs: &'a [(String, String)],
    taken: &[String],
) -> Vec<&'a str> {
    diffs
        .iter()
        .filter(|(h, _)| !taken.contains(h))
        .filter(|(_, d)| complained.iter().any(|n| changes_name(d, n)))
        .map(|(h, _)| h.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GCC: &str = "compiling the patched net/devlink/leftover.o failed (exit 1):\n\
        net/devlink/leftover.c: In function 'devlink_nl_port_fill':\n\
        net/devlink/leftover.c:1286:57: error: 'struct devlink_port' has no member named 'type_dev'\n\
        kernel/rcu/tree_nocb.h:824:9: error: implicit declaration of function ‘rcu_momentary_eqs’ [-Werror=implicit-function-declaration]\n\
        net/ipv4/tcp_minisocks.c:782:17: error: too few arguments to function 'inet_csk((const struct sock *)sk)->icsk_af_ops->syn_recv_sock'\n\
        net/x.c:1:1: note: declared here 'not_an_error_name'\n";

    #[test]
    fn names_come_from_the_errors_quotes() {
        let n: Vec<String> = quoted_names(GCC).into_iter().collect();
        assert_eq!(
            n,
            [
                "devlink_port",
                "icsk_af_ops",
                "inet_csk",
                "rcu_momentary_eqs",
                "sock",
                "syn_recv_sock",
                "type_dev"
            ]
        );
    }

    #[test]
    fn errors_name_the_files_they_are_in() {
        let files: Vec<String> = error_files(GCC).into_iter().collect();
        assert_eq!(
            files,
            [
                "kernel/rcu/tree_nocb.h",
                "net/devlink/leftover.c",
                "net/ipv4/tcp_minisocks.c"
            ]
        );
        let header = "./include/net/inet_hashtables.h:473:30: error: implicit declaration";
        assert_eq!(
            error_files(header).into_iter().collect::<Vec<_>>(),
            ["include/net/inet_hashtables.h"]
        );
        assert!(error_files("cc1: some warnings being treated as errors").is_empty());
    }

    #[test]
    fn only_the_headers_that_change_a_complained_of_name_are_wanted() {
        let diff = |file: &str, body: &str| {
            (
                file.to_string(),
                format!("--- a/{file}\n+++ b/{file}\n@@ -1 +1 @@\n{body}"),
            )
        };
        let diffs = [
            diff(
                "include/net/devlink.h",
                " struct devlink_port {\n-\tvoid *type_dev;\n+\tunion { } type_eth;\n",
            ),
            // Mentions the name only in context, and a longer word that contains it.
            diff(
                "include/net/other.h",
                " void type_dev(void);\n-int my_type_dev_x;\n+int my_type_dev_y;\n",
            ),
            diff(
                "include/linux/rcupdate.h",
                "+void rcu_momentary_eqs(void);\n",
            ),
        ];
        assert_eq!(
            wanted(&quoted_names(GCC), &diffs, &[]),
            ["include/net/devlink.h", "include/linux/rcupdate.h"]
        );
        let taken = ["include/net/devlink.h".to_string()];
        assert_eq!(
            wanted(&quoted_names(GCC), &diffs, &taken),
            ["include/linux/rcupdate.h"]
        );
        assert!(wanted(&quoted_names("no quotes: error: x"), &diffs, &[]).is_empty());
    }
}
