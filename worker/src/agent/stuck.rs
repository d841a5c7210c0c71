//! The stuck detector: patterns of a conversation going nowhere (after the
//! OpenHands SDK's): the same action with the same result 4 times; the same
//! error 3 times (nudge) or 4 times (stuck); 3 monologues in a row; and two
//! actions alternating for 6 steps.

/// One step of the conversation, reduced to what the patterns compare.
/// Serialisable: it is part of a conversation's checkpoint (ADR 0033).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    Action {
        /// Tool name and normalised arguments.
        call: String,
        observation: String,
        is_error: bool,
    },
    /// An assistant message without a tool call.
    Monologue,
}

/// What the detector concludes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Tell the model it is repeating itself.
    Nudge(String),
    Stuck(String),
}

fn same_tail<T: PartialEq>(steps: &[T], n: usize) -> bool {
    steps.len() >= n && steps[steps.len() - n..].windows(2).all(|w| w[0] == w[1])
}

/// Looks at the most recent steps.
pub fn check(steps: &[Step]) -> Verdict {
    let tail_errors = steps
        .iter()
        .rev()
        .take_while(|s| matches!(s, Step::Action { is_error: true, .. }))
        .count();
    if same_tail(steps, 4) {
        return match steps.last() {
            Some(Step::Monologue) => {
                Verdict::Stuck("the agent talked to itself 3 times in a row without acting".into())
            }
            Some(Step::Action { is_error: true, .. }) => {
                Verdict::Stuck("the same action failed with the same error 4 times".into())
            }
            _ => Verdict::Stuck("the same action gave the same result 4 times in a row".into()),
        };
    }
    if same_tail(steps, 3) {
        match steps.last() {
            Some(Step::Monologue) => {
                return Verdict::Stuck("the agent talked to itself 3 times in a row without acting".into())
            }
            Some(Step::Action { is_error: true, .. }) if tail_errors >= 3 => {
                return Verdict::Nudge(
                    "You have tried the same action 3 times and it failed the same way each time. \
                     Stop repeating it: read the error, change your approach, or call `finish` explaining what blocks you."
                        .into(),
                )
            }
            _ => {}
        }
    }
    if steps.len() >= 6 {
        let tail = &steps[steps.len() - 6..];
        let alternating = tail[0] != tail[1]
            && tail.iter().step_by(2).all(|s| *s == tail[0])
            && tail.iter().skip(1).step_by(2).all(|s| *s == tail[1])
            && matches!(tail[0], Step::Action { .. })
            && matches!(tail[1], Step::Action { .. });
        if alternating {
            return Verdict::Stuck(
                "the agent alternated between the same two actions for 6 steps".into(),
            );
        }
    }
    Verdict::Fine
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(call: &str, obs: &str) -> Step {
        Step::Action {
            call: call.into(),
            observation: obs.into(),
            is_error: false,
        }
    }

    fn err(call: &str, obs: &str) -> Step {
        Step::Action {
            call: call.into(),
            observation: obs.into(),
            is_error: true,
        }
    }

    #[test]
    fn four_identical_actions_and_results_are_stuck() {
        let steps = vec![act("ls", "a"); 3];
        assert_eq!(check(&steps), Verdict::Fine);
        let steps = vec![act("ls", "a"); 4];
        assert!(matches!(check(&steps), Verdict::Stuck(_)));
        // The same action with different results is progress (e.g. polling).
        let steps = vec![
            act("ls", "a"),
            act("ls", "b"),
            act("ls", "c"),
            act("ls", "d"),
        ];
        assert_eq!(check(&steps), Verdict::Fine);
    }

    #[test]
    fn the_same_error_nudges_at_three_and_stops_at_four() {
        let steps = vec![err("cat x", "no such file"); 3];
        assert!(matches!(check(&steps), Verdict::Nudge(_)));
        let steps = vec![err("cat x", "no such file"); 4];
        assert!(matches!(check(&steps), Verdict::Stuck(_)));
    }

    #[test]
    fn three_monologues_are_stuck() {
        assert_eq!(check(&[Step::Monologue, Step::Monologue]), Verdict::Fine);
        let three = vec![Step::Monologue; 3];
        assert!(matches!(check(&three), Verdict::Stuck(_)));
    }

    #[test]
    fn alternating_between_two_actions_for_six_steps_is_stuck() {
        let a = act("cat a", "1");
        let b = act("cat b", "2");
        let five = vec![a.clone(), b.clone(), a.clone(), b.clone(), a.clone()];
        assert_eq!(check(&five), Verdict::Fine);
        let mut six = five;
        six.push(b);
        assert!(matches!(check(&six), Verdict::Stuck(_)));
    }
}
