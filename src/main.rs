//! The `fluxlora` command line: parses arguments and calls into the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use fluxlora::commands::{self, LoraArg, ModelArgs, ResumeArg, SaveFormat};
use fluxlora::train::config::TrainConfig;
use fluxlora::train::pretrain_tiny::{pretrain, PretrainConfig};

#[derive(Parser)]
#[command(
    name = "fluxlora",
    version,
    about = "Train Flux LoRA adapters and sample images with them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: HTTP API over one engine that owns the model.
    Serve(ServeArgs),
    /// Generate images from a prompt (the built-in tiny model when no --model is given).
    Sample(SampleArgs),
    /// Train a LoRA from a TOML or JSON config, or the built-in demo with --demo.
    Train {
        /// The training config (see examples/).
        #[arg(required_unless_present = "demo")]
        config: Option<PathBuf>,
        /// Train the demo: a new colour ("zorbly") taught to the built-in tiny model.
        #[arg(long, conflicts_with = "config")]
        demo: bool,
        /// With --demo: the output folder (default demo-output/).
        #[arg(long, requires = "demo")]
        out: Option<PathBuf>,
        /// Continue from a saved state folder, or `auto` for the newest in the output folder.
        #[arg(long)]
        resume: Option<ResumeArg>,
    },
    /// Pretrain the built-in tiny model on generated shapes (writes assets/tiny/).
    PretrainTiny {
        #[arg(long, default_value = "assets/tiny")]
        out: PathBuf,
        #[arg(long)]
        vae_steps: Option<usize>,
        #[arg(long)]
        dit_steps: Option<u64>,
    },
    /// Measure training and sampling speed on a named configuration with seeded
    /// weights, beside the matmul peak (see docs/performance.md).
    Bench(commands::BenchArgs),
    /// Inspect, convert or merge LoRA files.
    #[command(subcommand)]
    Lora(LoraCommand),
    /// Print the ComfyUI node definitions (`/object_info`) with the LoRA folder's files.
    Nodes {
        #[arg(long, default_value = "fluxlora-data")]
        data_dir: PathBuf,
        /// A ComfyUI install: LoRAs are listed from its models/loras.
        #[arg(long)]
        comfy_root: Option<PathBuf>,
        /// One line instead of indented JSON.
        #[arg(long)]
        compact: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 7860)]
    port: u16,
    #[arg(long, default_value = "fluxlora-data")]
    data_dir: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// A ComfyUI install: finished LoRAs go to its models/loras.
    #[arg(long)]
    comfy_root: Option<PathBuf>,
    /// Bearer token (required when --host is not a loopback address).
    #[arg(long, env = "FLUXLORA_TOKEN")]
    token: Option<String>,
    /// Further folders requests may read (datasets, LoRAs); repeatable.
    #[arg(long = "root")]
    roots: Vec<PathBuf>,
    /// A browser origin allowed besides loopback ones (e.g. https://host:8188); repeatable.
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// ComfyUI's front end (the static folder of PyPI's comfyui-frontend-package),
    /// served at /; default: <data-dir>/frontend (scripts/get-frontend.sh puts it there).
    #[arg(long)]
    comfy_frontend: Option<PathBuf>,
    /// The front-end extension (the repo's js/), served at /extensions/fluxlora/;
    /// default: ./js, else the js/ of the checkout the binary was built in.
    #[arg(long)]
    comfy_js: Option<PathBuf>,
}

#[derive(Args)]
struct SampleArgs {
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    /// A LoRA file, optionally with a strength: FILE[:STRENGTH] (repeatable).
    #[arg(long = "lora")]
    loras: Vec<LoraArg>,
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Distilled guidance (dev models; ignored by schnell-style models).
    #[arg(long)]
    guidance: Option<f64>,
    /// True CFG scale with --negative: above 1, two model passes per step.
    #[arg(long)]
    cfg_scale: Option<f64>,
    /// img2img: start from this image (resized to the output size).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: share of the schedule run on the image, 0 to 1 (default 0.75).
    #[arg(long)]
    denoise: Option<f64>,
    /// Sampler: euler, euler_ancestral, heun or dpmpp_2m (A1111's names work too).
    #[arg(long, default_value = "euler")]
    sampler: fluxlora::sample::samplers::Sampler,
    /// Schedule: simple (Flux's shifted schedule) or beta.
    #[arg(long, default_value = "simple")]
    scheduler: fluxlora::sample::schedule::Scheduler,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Output PNG; with --batch > 1, `_N` is added before the extension.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum LoraCommand {
    /// Format, rank, alpha, targeted modules, unmatched keys and metadata of a LoRA file.
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert between kohya and diffusers/peft key formats.
    Convert {
        input: PathBuf,
        output: PathBuf,
        #[arg(long, value_enum, default_value_t = SaveFormat::Kohya)]
        to: SaveFormat,
        /// Save precision: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        precision: String,
    },
    /// Merge LoRAs into the base transformer and write a BFL-layout checkpoint.
    Merge {
        #[arg(long = "lora", required = true)]
        loras: Vec<LoraArg>,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // candle attaches a backtrace to every error it makes when RUST_BACKTRACE is
    // set, and those errors reach users as job errors (the job record, its events,
    // ComfyUI's and A1111's answers): keep them to one line. Panics still get
    // their backtrace from RUST_BACKTRACE; RUST_LIB_BACKTRACE=1 brings the rest back.
    // Set before any thread starts.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(a) => {
            let settings = fluxlora::config::Settings {
                host: a.host,
                port: a.port,
                data_dir: a.data_dir,
                model: a.model.model,
                comfy_root: a.comfy_root,
                token: a.token,
                device: a.model.device,
                precision: a.model.precision,
                roots: a.roots,
                cors_origins: a.cors_origins,
                comfy_frontend: a.comfy_frontend,
                comfy_js: a.comfy_js,
                ..Default::default()
            };
            commands::serve(settings)?;
        }
        Command::Sample(a) => {
            let req = fluxlora::sample::generate::SampleRequest {
                prompt: a.prompt,
                negative_prompt: a.negative,
                width: a.width,
                height: a.height,
                steps: a.steps,
                guidance: a.guidance,
                cfg_scale: a.cfg_scale,
                init_image: a.init_image,
                denoise: a.denoise,
                seed: a.seed,
                sampler: a.sampler,
                scheduler: a.scheduler,
                batch_size: a.batch,
            };
            for path in commands::sample(&a.model, &req, &a.loras, &a.out)? {
                println!("{}", path.display());
            }
        }
        Command::Train {
            config,
            demo,
            out,
            resume,
        } => {
            let path = match config {
                Some(config) if !demo => {
                    commands::train(TrainConfig::from_file(&config)?, resume.as_ref())?
                }
                _ => commands::demo(out.as_deref())?,
            };
            println!("{}", path.display());
        }
        Command::PretrainTiny {
            out,
            vae_steps,
            dit_steps,
        } => {
            let defaults = PretrainConfig::default();
            let cfg = PretrainConfig {
                out_dir: out,
                vae_steps: vae_steps.unwrap_or(defaults.vae_steps),
                dit_steps: dit_steps.unwrap_or(defaults.dit_steps),
                ..defaults
            };
            pretrain(&cfg, &mut |line| eprintln!("{line}"))?;
        }
        Command::Bench(args) => {
            print!(
                "{}",
                commands::bench(&args, &mut |line| eprintln!("{line}"))?
            )
        }
        Command::Lora(LoraCommand::Inspect { file, json }) => {
            print!("{}", commands::lora_inspect(&file, json)?);
        }
        Command::Lora(LoraCommand::Convert {
            input,
            output,
            to,
            precision,
        }) => {
            let report = commands::lora_convert(&input, &output, to, &precision)?;
            println!("{report}");
        }
        Command::Lora(LoraCommand::Merge { loras, model, out }) => {
            commands::lora_merge(&model, &loras, &out)?;
            println!("{}", out.display());
        }
        Command::Nodes {
            data_dir,
            comfy_root,
            compact,
        } => {
            let settings = fluxlora::config::Settings {
                data_dir,
                comfy_root,
                ..Default::default()
            };
            println!("{}", commands::nodes(&settings, compact)?);
        }
    }
    Ok(())
}
