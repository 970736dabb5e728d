namespace DeepSeekCuda.Loader;

/// <summary>
/// Opens the files of a model folder without trusting them: each must be a regular file (never a FIFO,
/// device, socket or folder, which would block or read forever), no larger than a limit named by the
/// caller, and a symbolic link must end inside the model folder, or, for a Hugging Face hub snapshot
/// (<c>.../snapshots/REV/</c>), inside that repository's <c>blobs</c> folder, which is where the hub's
/// links point. Refusals are <see cref="CheckpointException"/>s naming the file and the rule, never
/// anything read from the file.
/// </summary>
/// <remarks>
/// The checks run on the path before it is opened; a file swapped between the check and the open
/// (a race with someone who can already write the folder) is not covered.
/// </remarks>
internal static class ModelFiles
{
    /// <summary>Checks <paramref name="path"/> and opens it for reading.</summary>
    /// <param name="path">The file.</param>
    /// <param name="modelFolder">The folder whose files may be read; links must end inside it (or the hub's blobs).</param>
    /// <param name="maxBytes">The largest size accepted for this kind of file.</param>
    /// <exception cref="CheckpointException">Missing, not a regular file, too large, a link out of the folder, or unreadable.</exception>
    public static FileStream OpenRead(string path, string modelFolder, long maxBytes)
    {
        path = Path.GetFullPath(path);
        Check(path, modelFolder, maxBytes);
        return Open(path);
    }

    /// <summary>Checks <paramref name="path"/> as <see cref="OpenRead"/> does and reads all of it.</summary>
    public static byte[] ReadAllBytes(string path, string modelFolder, long maxBytes)
    {
        path = Path.GetFullPath(path);
        var size = CheckedSize(path, modelFolder, maxBytes);
        using var stream = Open(path);
        try
        {
            // The size checked, not the size now: a file that grew since is refused, not read past the limit.
            return FileStatus.ReadExactly(stream, size);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointException($"{path}: cannot read: {e.Message}", path, null, e);
        }
    }

    private static FileStream Open(string path)
    {
        try
        {
            return new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1, FileOptions.None);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointException($"{path}: cannot read: {e.Message}", path, null, e);
        }
    }

    /// <summary>
    /// Throws unless <paramref name="path"/> is (or links, inside the allowed folders, to) a regular file of
    /// at most <paramref name="maxBytes"/> bytes.
    /// </summary>
    /// <exception cref="CheckpointException">It is not.</exception>
    public static void Check(string path, string modelFolder, long maxBytes) => CheckedSize(Path.GetFullPath(path), modelFolder, maxBytes);

    /// <summary><see cref="Check"/> on a full path, returning the file's size.</summary>
    private static long CheckedSize(string path, string modelFolder, long maxBytes)
    {
        if (!OperatingSystem.IsLinux())
        {
            return CheckPortable(path, new FileInfo(path), maxBytes);
        }

        var real = FileStatus.RealPath(path) ?? throw new CheckpointException(
            new FileInfo(path).LinkTarget is null ? $"{path}: file not found" : $"{path}: file not found (a link to nothing)", path);
        if (real != path && !IsInsideAllowedFolders(real, modelFolder))
        {
            throw new CheckpointException(
                $"{path}: a symbolic link to {real}, outside the model folder; links may end only inside {modelFolder}{(HubBlobs(modelFolder) is { } b ? $" or {b}" : "")}",
                path);
        }

        (FileKind Kind, long Size) st;
        try
        {
            st = FileStatus.Stat(real);
        }
        catch (IOException e)
        {
            throw new CheckpointException($"{path}: cannot read its type: {e.Message}", path, null, e);
        }

        if (st.Kind != FileKind.Regular)
        {
            throw new CheckpointException($"{path}: not a regular file (it is {FileStatus.Describe(st.Kind)}); a model folder holds only regular files", path);
        }

        if (st.Size > maxBytes)
        {
            throw new CheckpointException($"{path}: {st.Size} bytes, over the limit of {maxBytes} for this file", path);
        }

        return st.Size;
    }

    private static long CheckPortable(string path, FileInfo info, long maxBytes)
    {
        if (!info.Exists)
        {
            throw new CheckpointException(Directory.Exists(path) ? $"{path}: not a regular file" : $"{path}: file not found", path);
        }

        if (info.Length > maxBytes)
        {
            throw new CheckpointException($"{path}: {info.Length} bytes, over the limit of {maxBytes} for this file", path);
        }

        return info.Length;
    }

    private static bool IsInsideAllowedFolders(string real, string modelFolder)
    {
        static bool Under(string file, string? folder) =>
            folder is not null && file.StartsWith(folder.EndsWith('/') ? folder : folder + "/", StringComparison.Ordinal);

        return Under(real, FileStatus.RealPath(Path.GetFullPath(modelFolder))) || Under(real, HubBlobs(modelFolder) is { } b ? FileStatus.RealPath(b) : null);
    }

    /// <summary>The hub cache's blobs folder of a snapshot folder (<c>REPO/snapshots/REV</c> → <c>REPO/blobs</c>), when it is one.</summary>
    private static string? HubBlobs(string modelFolder)
    {
        var full = Path.TrimEndingDirectorySeparator(Path.GetFullPath(modelFolder));
        var snapshots = Path.GetDirectoryName(full);
        return snapshots is not null && Path.GetFileName(snapshots) == "snapshots" && Path.GetDirectoryName(snapshots) is { } repo
            ? Path.Combine(repo, "blobs")
            : null;
    }
}
