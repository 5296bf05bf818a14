//! `neuroshard chat`: a terminal chat over a swarm (`--peers`) or an in-process one
//! (`--model`), multi-turn with the model's chat template and streamed answers. Commands:
//! `/reset`, `/system TEXT`, `/quit` (or Ctrl-D). Ctrl-C stops the current answer and the chat
//! goes on.

use crate::common::{print_piece, tokio_runtime, SamplingArgs, SwarmSource};
use neuroshard_core::{ChatSession, Error, FinishReason};
use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Flags of `neuroshard chat`.
#[derive(clap::Args, Debug)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    swarm: SwarmSource,
    /// The system message (change it with /system TEXT).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

const HELP: &str = "commands: /reset (new chat), /system TEXT (system message), /quit; \
                    Ctrl-C stops an answer, Ctrl-D quits";

pub(crate) fn run(args: ChatArgs) -> Result<(), Error> {
    let runtime = tokio_runtime()?;
    let (local, swarm) = runtime.block_on(args.swarm.connect())?;
    // Ctrl-C stops the answer being streamed; at the prompt it only reminds how to leave.
    let interrupted = Arc::new(AtomicBool::new(false));
    let answering = Arc::new(AtomicBool::new(false));
    {
        let (interrupted, answering) = (interrupted.clone(), answering.clone());
        runtime.spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                if answering.load(Ordering::SeqCst) {
                    interrupted.store(true, Ordering::SeqCst);
                } else {
                    eprint!("\n(/quit or Ctrl-D leaves)\n> ");
                }
            }
        });
    }
    let _entered = runtime.enter();
    let mut chat = ChatSession::new(swarm.clone(), args.sampling.params(), args.max_tokens);
    chat.set_system(args.system.clone());
    eprintln!(
        "chatting with {} ({} layers) via {}; {HELP}",
        swarm.model_id(),
        swarm.layers(),
        swarm.entry().id.fmt_short()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("> ");
        let _ = std::io::stdout().flush();
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                chat.reset();
                println!("(new chat)");
                continue;
            }
            "/help" => {
                println!("{HELP}");
                continue;
            }
            _ => {}
        }
        if let Some(system) = line.strip_prefix("/system") {
            let system = system.trim();
            chat.set_system(Some(system.to_string()));
            println!(
                "(system message set{})",
                if system.is_empty() {
                    " to the template's default"
                } else {
                    ""
                }
            );
            continue;
        }
        if line.starts_with('/') {
            println!("unknown command {line}; {HELP}");
            continue;
        }
        interrupted.store(false, Ordering::SeqCst);
        answering.store(true, Ordering::SeqCst);
        let result = chat.send(line, &mut |piece| {
            print_piece(piece);
            if interrupted.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        answering.store(false, Ordering::SeqCst);
        match result {
            Ok(reply) if reply.finish == FinishReason::Cancelled => println!("\n(stopped)"),
            Ok(reply) if reply.finish == FinishReason::Length => println!("\n(max tokens)"),
            Ok(_) => println!(),
            Err(e) => println!("\n(error: {e})"),
        }
    }
    chat.reset();
    drop(_entered);
    if let Some(local) = local {
        runtime.block_on(local.shutdown());
    }
    Ok(())
}
