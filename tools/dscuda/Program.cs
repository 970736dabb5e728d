return await DeepSeekCuda.Cli.CliApp.RunAsync(args, Console.Out, Console.Error);
