return await DeepSeekCuda.Cli.CliApp.RunAsync(args, Console.In, Console.Out, Console.Error);
