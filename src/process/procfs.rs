//! Reading /proc: a process's state, parent and group (`stat`), every process, a process's
//! children (the kernel's `children` lists) and descendants, and whether a pid is an ancestor of
//! this process. Read-only; a process that vanishes meanwhile is skipped.

use std::fs;

/// The fields of a /proc/PID/stat line that heimdall reads.
pub struct StatFields {
    pub state: String,
    pub ppid: i32,
    pub pgrp: i32,
}

impl StatFields {
    /// A zombie (exited, not reaped) or dead process.
    pub fn gone(&self) -> bool {
        self.state == "Z" || self.state == "X"
    }
}

/// The stat fields of process `pid`, None if it is gone.
pub fn stat(pid: i32) -> Option<StatFields> {
    stat_fields(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The fields after the command name, which is in parentheses and may contain anything.
fn stat_fields(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_owned();
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(StatFields { state, ppid, pgrp })
}

/// Every process in /proc with its stat fields.
pub fn processes() -> impl Iterator<Item = (i32, StatFields)> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            Some((pid, stat_fields(&stat)?))
        })
}

/// The children of `pid`, from each of its threads' `children` file; `None` when none of those
/// files could be read (a kernel without CONFIG_PROC_CHILDREN, or `pid` gone). A thread that
/// exits between the listing and the read is skipped: the children of an exiting thread pass
/// to a live one, which is read too.
pub fn children(pid: i32) -> Option<Vec<i32>> {
    let mut children = Vec::new();
    let mut read_any = false;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(text) = fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        read_any = true;
        children.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    read_any.then_some(children)
}

/// This process's children; from all of /proc only when the kernel provides no `children`
/// file. A thread that exits meanwhile (the connect thread, the child-watching thread) is not
/// taken for a kernel without the files: that mistake cost a scan of every process on the host.
pub fn own_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    children(me).unwrap_or_else(|| {
        processes()
            .filter(|(_, fields)| fields.ppid == me)
            .map(|(pid, _)| pid)
            .collect()
    })
}

/// Every descendant of `root` but `except` and its own, from the kernel's `children` lists.
pub fn descendants(root: i32, except: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut next = children(root).unwrap_or_default();
    while let Some(pid) = next.pop() {
        if pid == except || found.contains(&pid) {
            continue;
        }
        found.push(pid);
        next.extend(children(pid).unwrap_or_default());
    }
    found
}

/// True if `pid` is this process's parent, grandparent, and so on.
pub fn is_ancestor(pid: i32) -> bool {
    if pid <= 1 {
        return false;
    }
    let mut current = std::os::unix::process::parent_id() as i32;
    // A parent chain is short; the bound only guards against a loop read from a racing /proc.
    for _ in 0..4096 {
        if current == pid {
            return true;
        }
        if current <= 1 {
            return false;
        }
        match stat(current) {
            Some(fields) => current = fields.ppid,
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_state_and_group_even_with_odd_command_names() {
        let stat = "4211 (a) b (c)) S 1 4200 4200 0 -1 4194560 0 0";
        let fields = stat_fields(stat).unwrap();
        assert_eq!(
            (fields.state.as_str(), fields.ppid, fields.pgrp),
            ("S", 1, 4200)
        );
        assert!(stat_fields("garbage").is_none());
    }

    #[test]
    fn this_processs_parent_is_an_ancestor_and_init_and_itself_are_not() {
        let parent = std::os::unix::process::parent_id() as i32;
        let me = std::process::id() as i32;
        assert!(is_ancestor(parent));
        assert!(!is_ancestor(me));
        assert!(!is_ancestor(1));
    }
}
