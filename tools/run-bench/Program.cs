using System.CommandLine;
using DeepSeekCuda.Bench.Benches;

// One subcommand per bench; each lives in Benches/.
var root = new RootCommand("DeepSeekCuda benchmarks");
root.Subcommands.Add(TokenizerBench.Create());
root.Subcommands.Add(GemmBench.Create());
return root.Parse(args).Invoke();
