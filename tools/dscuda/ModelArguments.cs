using System.CommandLine;
using DeepSeekCuda.Model;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Serving;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Cli;

/// <summary>
/// The options of every command that loads a model to generate with: <c>--model</c>, <c>--tokenizer</c>,
/// <c>--device</c>, <c>--gpus</c>, <c>--placement</c>, <c>--ctx-size</c>, <c>--mtp</c>, with <see cref="Load"/> and <see cref="ChatClientOptions"/>
/// so a command needs one call for each. <c>logits</c> takes only <c>--model</c> and <c>--device</c>
/// (<c>generation: false</c>): it runs one prefill of a length it knows, without tokenizer or MTP.
/// </summary>
internal sealed class ModelArguments
{
    private readonly Option<string?> _model = ModelOption.Create();
    private readonly Option<string> _device = DeviceOption.Create();
    private readonly Option<string?> _gpus = GpuOption.CreateGpus();
    private readonly Option<string> _placement = GpuOption.CreatePlacement();
    private readonly Option<string?> _tokenizer = new("--tokenizer")
    {
        Description = "Folder with tokenizer.json (and tokenizer_config.json) when the checkpoint folder has none",
    };

    private readonly Option<int?> _ctxSize = new("--ctx-size")
    {
        Description = "Longest request, prompt and output, in tokens; default: max_position_embeddings, or less when memory cannot hold that many (-v says which and why)",
    };

    private readonly Option<string> _mtp = new("--mtp")
    {
        Description = "MTP speculative decoding: auto (draft, stop when drafts are rarely accepted), on (required), off",
        DefaultValueFactory = _ => "auto",
    };

    private readonly bool _generation;

    public ModelArguments(bool generation = true)
    {
        _generation = generation;
        _mtp.AcceptOnlyFromAmong("auto", "on", "off");
    }

    public void AddTo(Command command)
    {
        command.Add(_model);
        command.Add(_device);
        if (_generation)
        {
            command.Add(_gpus);
            command.Add(_placement);
            command.Add(_tokenizer);
            command.Add(_ctxSize);
            command.Add(_mtp);
        }
    }

    /// <summary>The checkpoint folder: --model, or the demo (saying so).</summary>
    public string ModelDirectory(ParseResult parse, TextWriter log) => ModelOption.Resolve(parse.GetValue(_model), log);

    /// <summary>The backend --device asks for (cuda must be usable here).</summary>
    public ComputeDevice Device(ParseResult parse) => DeviceOption.Parse(parse.GetValue(_device));

    /// <summary>
    /// The backend --device asks for and the GPUs --gpus names (null: not given), both checked: cuda or a GPU list must be
    /// usable here, and a GPU list goes with --device auto or cuda.
    /// </summary>
    public (ComputeDevice Device, IReadOnlyList<int>? Gpus) Devices(ParseResult parse)
    {
        var device = Device(parse);
        var given = parse.GetValue(_gpus);
        if (given is not null && device == ComputeDevice.Cpu)
        {
            throw new UserErrorException($"--gpus {given}: runs on the CUDA backend; drop --device cpu or --gpus");
        }

        return (device, GpuOption.Parse(given));
    }

    /// <summary>The speculative decoding --mtp asks for.</summary>
    public SpeculativeDecodingMode Mtp(ParseResult parse) => parse.GetValue(_mtp) switch
    {
        "on" => SpeculativeDecodingMode.On,
        "off" => SpeculativeDecodingMode.Off,
        _ => SpeculativeDecodingMode.Auto,
    };

    /// <summary>
    /// Loads the model the options name, with a progress bar on <paramref name="log"/> and the engine's log lines
    /// through <paramref name="loggerFactory"/>. Option mistakes are one-line errors naming the option.
    /// </summary>
    /// <param name="parse">The parsed command line.</param>
    /// <param name="log">Where progress and notes go (stderr).</param>
    /// <param name="loggerFactory">Receives the backend choice, the context length and why, and the load summary.</param>
    /// <param name="concurrentRequests">Requests the caller runs at once, for sizing the default context (1 for generate and chat; a server's MaxBatch).</param>
    /// <param name="cancellationToken">Cancels the load between layers.</param>
    public LocalModel Load(ParseResult parse, TextWriter log, ILoggerFactory loggerFactory, int concurrentRequests = 1, CancellationToken cancellationToken = default)
    {
        var ctx = parse.GetValue(_ctxSize);
        if (ctx is < 1)
        {
            throw new UserErrorException($"--ctx-size {ctx}: must be at least 1");
        }

        var (device, gpus) = Devices(parse);
        var placement = GpuOption.Placement(parse.GetValue(_placement));
        var mtp = Mtp(parse);
        var dir = ModelDirectory(parse, log);
        var tokenizer = parse.GetValue(_tokenizer) is { Length: > 0 } t ? t : null;
        var options = new LocalModelOptions
        {
            Device = device,
            Gpus = gpus,
            Placement = placement,
            MaxSequenceLength = ctx,
            ConcurrentSessions = concurrentRequests,
            TokenizerDirectory = tokenizer,
        };
        if (mtp == SpeculativeDecodingMode.On)
        {
            // Before the weights are read (minutes for a real checkpoint): opening reads config and headers only.
            using var checkpoint = Checkpoint.Open(dir);
            if (checkpoint.Config.NumNextNPredictLayers == 0)
            {
                throw new UserErrorException($"--mtp on: {dir} has no MTP module (num_nextn_predict_layers is 0); use --mtp auto or off");
            }
        }

        LocalModel? local = null;
        try
        {
            Progress.Run($"loading {dir}", log, p => local = LocalModel.Load(dir, options, p, loggerFactory.CreateLogger<LocalModel>(), cancellationToken));
        }
        catch (ArgumentOutOfRangeException e) when (e.ParamName == nameof(LocalModelOptions.MaxSequenceLength))
        {
            throw new UserErrorException($"--ctx-size {ctx}: {e.Reason()}");
        }
        catch (ArgumentException e) when (e.ParamName == nameof(LocalModelOptions.Gpus))
        {
            throw new UserErrorException($"--gpus {parse.GetValue(_gpus)}: {e.Reason()}");
        }
        catch (PlacementException e)
        {
            throw new UserErrorException($"--gpus {parse.GetValue(_gpus)} --placement {parse.GetValue(_placement)}: {e.Message}");
        }
        catch (FileNotFoundException e) when (tokenizer is null && Path.GetFileName(e.FileName) == "tokenizer.json")
        {
            // Test fixtures and some conversions ship the weights alone.
            throw new UserErrorException($"{e.Message}: give the folder that has it with --tokenizer DIR");
        }

        return local!;
    }

    /// <summary>The chat client settings these options imply for <paramref name="local"/> (its chat format and name, --mtp).</summary>
    public DeepSeekChatClientOptions ChatClientOptions(ParseResult parse, LocalModel local) => new()
    {
        TemplateKind = local.TemplateKind,
        ModelId = Path.GetFileName(local.Directory.TrimEnd(Path.DirectorySeparatorChar)),
        SpeculativeDecoding = Mtp(parse),
    };
}
