//! Error chains as text, for messages that leave the process (API error
//! bodies, agent replies, logs).

/// An error with its causes, joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    causes(e).join(": ")
}

/// An error and its causes, one per line: the API sends each line as one
/// string of its error chain.
pub fn error_lines(e: &dyn std::error::Error) -> String {
    causes(e).join("\n")
}

fn causes(e: &dyn std::error::Error) -> Vec<String> {
    let mut all = vec![e.to_string()];
    let mut source = e.source();
    while let Some(cause) = source {
        all.push(cause.to_string());
        source = cause.source();
    }
    all
}
